"""Read-only volumes are id-mapped (issue 11 item 4); what that must never open.

zviz maps a read-only bind volume through the container's user namespace so that the
kubelet's files (a secret 0640 to the fsGroup, a token 0600 to the runAsUser) keep the
ids the pod asked for. Through such a mount host root's files look like the container
root's own, so the mount must stay read-only: nothing written, no mode changed, nothing
created as host root. A writable volume is never mapped: what the container's root
writes there belongs to its unprivileged host uid, not to host root.
"""

import os
import stat

from integration.security.test_audit_landlock import base, run_in_image  # noqa: F401

HOST_ROOT_FILE = "owned by host root\n"


def _volume(directory, name):
    volume = os.path.join(directory, name)
    os.makedirs(volume)
    os.chmod(volume, 0o755)
    path = os.path.join(volume, "file")
    with open(path, "w") as f:
        f.write(HOST_ROOT_FILE)
    os.chmod(path, 0o644)
    return volume, path


def _unchanged(image_rootfs):
    return None


def test_a_read_only_volume_looks_like_roots_own_and_stays_unwritable(zviz_bin, base):  # noqa: F811
    volume, path = _volume(base, "ro-volume")
    script = (
        "stat -c 'owner %u' /vol/file; "
        "echo x >> /vol/file && echo WROTE; chmod 4777 /vol/file && echo CHMODDED; "
        "touch /vol/new && echo CREATED; chown 0:0 /vol && echo CHOWNED; "
        "mount -o remount,rw /vol 2>/dev/null && echo REMOUNTED; echo DONE"
    )
    mount = {"destination": "/vol", "type": "bind", "source": volume, "options": ["rbind", "ro"]}
    result = run_in_image(zviz_bin, base, "ci-runner", script, _unchanged, mounts=[mount])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Mapped: host root's file is the container root's (unmapped it would be 65534).
    assert lines[0] == "owner 0", result.stdout
    assert lines[-1] == "DONE"
    for done in ("WROTE", "CHMODDED", "CREATED", "CHOWNED", "REMOUNTED"):
        assert done not in lines, result.stdout
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o644 and info.st_uid == 0
    with open(path) as f:
        assert f.read() == HOST_ROOT_FILE
    assert os.listdir(volume) == ["file"]


def test_a_writable_volume_is_not_mapped(zviz_bin, base):  # noqa: F811
    volume, _ = _volume(base, "rw-volume")
    os.chmod(volume, 0o777)
    script = "stat -c 'owner %u' /vol/file; echo made > /vol/new && echo CREATED"
    mount = {"destination": "/vol", "type": "bind", "source": volume, "options": ["rbind", "rw"]}
    result = run_in_image(zviz_bin, base, "ci-runner", script, _unchanged, mounts=[mount])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["owner 65534", "CREATED"], result.stdout
    # What the container's root wrote belongs to its host uid, never to host root.
    assert os.stat(os.path.join(volume, "new")).st_uid == 100000
