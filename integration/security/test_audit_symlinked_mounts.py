"""An image symlink must not move /dev or a volume onto the rootfs (issue 10, items 8, 9).

The image owns its rootfs, symlinks included. With /dev -> /tmp the /dev tmpfs lands
on /tmp, where the profile's write rule on /tmp covers it and the /dev allowlist (a
Landlock rule on /dev, which follows no symlink) never applies: a device config.json
adds opens read-write and files appear in "/dev". With /data -> / a volume at /data
is mounted over the rootfs itself and the volume's write rule lands on "/": the
whole rootfs becomes writable. zviz must refuse both images.
"""

import os
import shutil

from integration.security.test_audit_landlock import base, run_in_image  # noqa: F401
from integration.zviz_cli import edit_config


def _replace_with_symlink(name, target):
    def change(rootfs):
        path = os.path.join(rootfs, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.symlink(target, path)

    return change


def test_dev_symlinked_elsewhere_is_refused(zviz_bin, base):  # noqa: F811
    script = (
        "echo planted > /dev/newfile && echo CREATED; "
        "(exec 3<>/dev/fuse) 2>/dev/null && echo FUSE_OPEN; echo DONE"
    )
    bundle_change = _replace_with_symlink("dev", "/tmp")
    device = {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}

    def change(rootfs):
        bundle_change(rootfs)
        edit_config(
            os.path.dirname(rootfs),
            lambda config: config["linux"].setdefault("devices", []).append(device),
        )

    result = run_in_image(zviz_bin, base, "ci-runner", script, change)
    assert "CREATED" not in result.stdout and "FUSE_OPEN" not in result.stdout, result.stdout
    assert result.returncode != 0 and "DONE" not in result.stdout, result.stdout
    assert "/dev" in result.stderr and "symlink" in result.stderr, result.stderr


def test_volume_whose_destination_is_a_symlink_to_root_is_refused(zviz_bin, base):  # noqa: F811
    volume = os.path.join(base, "volume")
    os.makedirs(volume)
    os.chmod(volume, 0o777)
    script = (
        "echo x > /etc/pwned && echo PWNED_ETC; echo x > /bin/pwned && echo PWNED_BIN; echo DONE"
    )
    mount = {"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "rw"]}
    data_to_root = _replace_with_symlink("data", "/")

    def change(rootfs):
        data_to_root(rootfs)
        # A writable rootfs, as most images run: Landlock is then what keeps it read-only.
        edit_config(os.path.dirname(rootfs), lambda config: config["root"].update(readonly=False))

    result = run_in_image(zviz_bin, base, "ci-runner", script, change, mounts=[mount])
    assert "PWNED" not in result.stdout, result.stdout
    assert result.returncode != 0 and "DONE" not in result.stdout, result.stdout
    assert "/data: lands on / through an image symlink" in result.stderr, result.stderr


def test_volume_whose_destination_is_a_symlink_to_dev_is_refused(zviz_bin, base):  # noqa: F811
    # The volume would stack on the /dev tmpfs and take the devices and its write
    # rule with it: the /dev allowlist again, by another way.
    volume = os.path.join(base, "volume")
    os.makedirs(volume)
    os.chmod(volume, 0o777)
    script = "echo planted > /dev/newfile && echo CREATED; echo DONE"
    mount = {"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "rw"]}
    result = run_in_image(
        zviz_bin, base, "ci-runner", script, _replace_with_symlink("data", "/dev"), mounts=[mount]
    )
    assert "CREATED" not in result.stdout, result.stdout
    assert os.listdir(volume) == [], "devices were bound into the volume's host directory"
    assert result.returncode != 0 and "DONE" not in result.stdout, result.stdout
    assert "/data: lands on /dev through an image symlink" in result.stderr, result.stderr
