"""`zviz node install | uninstall` against temporary containerd configs in both formats.

Every run names a temporary directory as the root (--root): nothing here touches /etc or
/usr/local/bin. The real containerd loading what install writes is integration/test_node.py.
"""

import glob
import os
import tomllib

import pytest

from runtime import static_programs
from runtime.commands import run_cli
from runtime.node import containerd as containerd_config

V2_WITH_CRI = """version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.example/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""
V2_WITHOUT_CRI = """version = 2
# the operator's comment stays
[debug]
  level = "info"
"""
V3_WITH_CRI = """version = 3

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
"""


@pytest.fixture
def root(tmp_path):
    os.makedirs(tmp_path / "etc" / "containerd")
    return tmp_path


@pytest.fixture(autouse=True)
def anchor_path(tmp_path_factory, monkeypatch) -> str:
    """Where install builds the exec anchor (and the broker's warden beside it): the
    install's own bin directory (not under --root), here a directory of the test's rather
    than the checkout's .venv/bin."""
    from runtime import exec_anchor
    from runtime.security.broker import warden

    bin_dir = tmp_path_factory.mktemp("install-bin")
    path = str(bin_dir / exec_anchor.BINARY_NAME)
    monkeypatch.setattr(exec_anchor, "binary_path", lambda: path)
    monkeypatch.setattr(warden, "binary_path", lambda: str(bin_dir / warden.BINARY_NAME))
    return path


def config_file(root) -> str:
    return str(root / "etc" / "containerd" / "config.toml")


def write_config(root, text: str) -> str:
    path = config_file(root)
    with open(path, "w") as f:
        f.write(text)
    return path


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def node(root, *args) -> int:
    return run_cli(["node", *args, "--root", str(root)])


def merged(path: str) -> dict:
    """The config as containerd 2.x sees it: the main file and each import, merged."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    for pattern in data.get("imports", []):
        for imported in sorted(glob.glob(pattern)):
            with open(imported, "rb") as f:
                _deep_merge(data, tomllib.load(f))
    return data


def _deep_merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def zviz_entry(data: dict, version: int) -> dict:
    return data["plugins"][containerd_config.CRI_PLUGIN[version]]["containerd"]["runtimes"]["zviz"]


def files_under(root) -> dict[str, bytes]:
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            found[path] = (
                os.readlink(path).encode() if os.path.islink(path) else open(path, "rb").read()
            )
    return found


@pytest.mark.parametrize(
    "text,version,drop_in",
    [
        # 1.x replaces a whole plugin section on import: the CRI section must stay one file
        (V2_WITH_CRI, 2, False),
        (V2_WITHOUT_CRI, 2, True),
        # 2.x merges imports key by key: a drop-in beside any config
        (V3_WITH_CRI, 3, True),
    ],
    ids=["v2-cri-in-main", "v2-no-cri", "v3"],
)
def test_install_registers_zviz_idempotently_and_uninstall_restores_the_bytes(
    root, capsys, text, version, drop_in
):
    path = write_config(root, text)
    assert node(root, "install") == 0
    out = capsys.readouterr().out
    assert "kind: RuntimeClass" in out and "handler: zviz" in out
    after_first = files_under(root)
    data = merged(path)
    assert zviz_entry(data, version) == {"runtime_type": "io.containerd.zviz.v2"}
    assert containerd_config.registered(path)[0]
    drop_in_path = containerd_config.drop_in_path(path)
    assert os.path.exists(drop_in_path) == drop_in
    if version == 2 and not drop_in:
        assert read(path).startswith(text)  # appended: the operator's text as it was
    assert read(path + ".zviz-backup") == text
    shim = root / "usr" / "local" / "bin" / "containerd-shim-zviz-v2"
    with open(shim, "rb") as f:
        assert f.read(4) == b"\x7fELF"  # the fork server's compiled client for `start`

    assert node(root, "install") == 0
    assert files_under(root) == after_first  # the same bytes, the same files

    assert node(root, "uninstall") == 0
    assert read(path) == text
    assert not os.path.exists(drop_in_path)
    assert not os.path.lexists(shim)
    assert not os.path.exists(path + ".zviz-backup")
    assert not os.path.lexists(root / "usr" / "local" / "bin" / "zviz")


def test_a_missing_config_is_created_for_the_detected_containerd_and_removed_again(
    root, monkeypatch
):
    monkeypatch.setattr(containerd_config, "containerd_version", lambda: "2.1.4")
    path = config_file(root)
    assert node(root, "install") == 0
    assert "version = 3" in read(path)
    assert zviz_entry(merged(path), 3)["runtime_type"] == "io.containerd.zviz.v2"
    assert node(root, "uninstall") == 0
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    "text",
    [
        'version = 2\n[plugins."io.containerd.grpc.v1.cri"\n',  # broken TOML
        '[plugins.cri]\n  sandbox_image = "x"\n',  # no version: a version-1 config
        "version = 4\n",  # unknown
        # zviz's handler name taken by another runtime
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.zviz]\n'
        '  runtime_type = "io.containerd.runc.v2"\n',
    ],
    ids=["broken", "version-1", "version-4", "handler-taken"],
)
def test_a_config_zviz_cannot_edit_is_reported_and_left_untouched(root, capsys, text):
    write_config(root, text)
    before = files_under(root)
    assert node(root, "install") == 1
    assert "REFUSED" in capsys.readouterr().out
    assert files_under(root) == before  # not even the shim link: nothing half-installed


def test_dry_run_changes_nothing(root, capsys):
    write_config(root, V2_WITHOUT_CRI)
    before = files_under(root)
    assert node(root, "install", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would write" in out and "runtimes.zviz" in out
    # Each program says what it would be: the compiled client, or a link to the Python entry.
    for label in ("shim", "zviz"):
        line = next(x for x in out.splitlines() if x.startswith(f"{label}: would "))
        assert line.endswith(": the compiled fork-server client") or (
            " -> " in line and line.endswith("(the Python entry: no C compiler)")
        ), line
    assert files_under(root) == before


def test_existing_imports_that_miss_the_drop_in_get_a_block_instead(root):
    text = 'version = 3\nimports = ["/etc/containerd/other/*.toml"]\n'
    path = write_config(root, text)
    assert node(root, "install") == 0
    assert read(path).startswith(text)
    assert zviz_entry(merged(path), 3)["runtime_type"] == "io.containerd.zviz.v2"
    assert node(root, "uninstall") == 0
    assert read(path) == text


def test_uninstall_keeps_edits_made_since_install(root):
    path = write_config(root, V2_WITH_CRI)
    assert node(root, "install") == 0
    with open(path, "a") as f:
        f.write('\n[debug]\n  level = "debug"\n')
    assert node(root, "uninstall") == 0
    assert read(path) == V2_WITH_CRI + '\n[debug]\n  level = "debug"\n'


def test_without_a_compiler_zviz_is_the_python_entry_and_says_so(root, capsys, monkeypatch):
    from runtime import forkserver
    from runtime.node import install

    real_which = install.shutil.which
    monkeypatch.setattr(
        install.shutil, "which", lambda name: None if name in ("cc", "gcc") else real_which(name)
    )
    write_config(root, V2_WITHOUT_CRI)
    assert node(root, "install") == 0
    assert "the slow path" in capsys.readouterr().out
    entry = root / "usr" / "local" / "bin" / "zviz"
    assert os.readlink(entry) == install.python_entry()
    with open(entry, "rb") as f:
        assert f.read(2) == b"#!"
    shim = root / "usr" / "local" / "bin" / install.SHIM_NAME
    assert os.readlink(shim) == install.python_entry(forkserver.SHIM_ENTRY)


def test_install_builds_the_exec_anchor_where_the_runtime_looks_and_uninstall_leaves_it(
    root, capsys, anchor_path
):
    from runtime import exec_anchor
    from runtime.node import check
    from runtime.security.broker import warden

    if not static_programs.has_static_libc("cc"):
        pytest.skip("no static libc (libc6-dev): the anchor cannot be built here")
    write_config(root, V2_WITHOUT_CRI)
    assert check._exec_anchor().status == "warn"
    assert node(root, "install") == 0
    out = capsys.readouterr().out
    assert f"exec-anchor: {anchor_path} (execs run in PID 1's Landlock domain)" in out
    assert static_programs.built_layout(anchor_path) == exec_anchor.MAGIC
    warden_path = warden.binary_path()
    assert f"broker-warden: {warden_path} (each seccomp broker's warden is this" in out
    assert static_programs.built_layout(warden_path) == warden.LAYOUT
    assert check._broker_warden().status == "ok"
    first = os.stat(anchor_path)
    assert node(root, "install") == 0  # the same binary: left alone
    assert os.stat(anchor_path).st_mtime_ns == first.st_mtime_ns
    assert check._exec_anchor().status == "ok"
    assert node(root, "uninstall") == 0
    assert os.path.exists(anchor_path)  # the install's, like its shim script


def test_without_a_compiler_install_says_execs_cannot_reach_pid_1(root, capsys, monkeypatch):
    from runtime.node import install

    real_which = install.shutil.which
    monkeypatch.setattr(
        install.shutil, "which", lambda name: None if name in ("cc", "gcc") else real_which(name)
    )
    write_config(root, V2_WITHOUT_CRI)
    assert node(root, "install") == 0
    out = capsys.readouterr().out
    assert "exec-anchor: not built (no C compiler or no static libc)" in out, out
    assert "install gcc and libc6-dev, then run `zviz node install` again" in out
    assert "broker-warden: not built (no C compiler or no static libc): each seccomp" in out


def test_node_check_says_when_execs_cannot_reach_pid_1(anchor_path):
    from runtime.node import check

    missing = check._exec_anchor()
    assert missing.status == "warn"
    assert missing.detail.startswith(f"no {anchor_path}: execs get a Landlock domain of their own")
    assert missing.detail.endswith("install gcc and libc6-dev, then run `zviz node install`")
    # An anchor from before an upgrade (another request layout): its requests would fail.
    with open(anchor_path, "w") as f:
        f.write("#!/bin/sh\necho 0x7a76616e\n")
    os.chmod(anchor_path, 0o755)
    stale = check._exec_anchor()
    assert stale.status == "warn" and "built from another version's source" in stale.detail


def test_node_check_says_when_brokers_fork_a_python_warden():
    from runtime.node import check
    from runtime.security.broker import warden

    missing = check._broker_warden()
    assert missing.status == "warn"
    assert missing.detail == (
        f"no {warden.binary_path()}: each seccomp broker forks a Python warden (~1 MiB more"
        " a container); install gcc and libc6-dev, then run `zviz node install`"
    )


@pytest.mark.parametrize("fast_path", ["fast-path", "shim-fast-path"])
def test_node_check_says_when_zviz_or_the_shim_runs_the_slow_path(tmp_path, monkeypatch, fast_path):
    from runtime.node import check

    name, program, cost = next(each for each in check.FAST_PATHS if each[0] == fast_path)
    script = tmp_path / program
    script.write_text("#!/usr/bin/python3\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    result = check._fast_path(name, program, cost)
    assert result.status == "warn" and "slow path" in result.detail and cost in result.detail
    script.write_bytes(b"\x7fELF")  # the compiled client
    assert check._fast_path(name, program, cost).status == "ok"


def test_a_foreign_zviz_in_the_bin_dir_stops_install_before_anything_is_written(root, capsys):
    write_config(root, V2_WITHOUT_CRI)
    bin_dir = root / "usr" / "local" / "bin"
    os.makedirs(bin_dir)
    (bin_dir / "zviz").write_text("someone else's zviz\n")
    before = files_under(root)
    assert node(root, "install") == 1
    assert "is not zviz's" in capsys.readouterr().out
    assert files_under(root) == before


def fake_apparmor(root, enabled: str, loaded: str | None = None, restrict: str | None = None):
    """The root's /sys and /proc say what AppArmor does: a stand-in for a node with the LSM
    (this machine's kernel has none; the real load is integration/test_node_apparmor.py, in
    Debian's kernel, which lacks Ubuntu's restrict_unprivileged_userns sysctl: RESTRICT
    stands in for it)."""
    parameters = root / "sys" / "module" / "apparmor" / "parameters"
    os.makedirs(parameters)
    (parameters / "enabled").write_text(enabled + "\n")
    if loaded is not None:
        securityfs = root / "sys" / "kernel" / "security" / "apparmor"
        os.makedirs(securityfs)
        (securityfs / "profiles").write_text(loaded)
    if restrict is not None:
        os.makedirs(root / "proc" / "sys" / "kernel")
        (root / "proc" / "sys" / "kernel" / "apparmor_restrict_unprivileged_userns").write_text(
            restrict + "\n"
        )


def fake_parser_abi(root, version: str) -> None:
    """The abi file apparmor_parser VERSION ships (4.0: the first to know `userns`)."""
    abi = root / "etc" / "apparmor.d" / "abi"
    os.makedirs(abi)
    (abi / version).write_text("# abi\n")


def test_the_apparmor_profile_is_installed_only_where_apparmor_is_active(root, capsys):
    write_config(root, V2_WITHOUT_CRI)
    profile = root / "etc" / "apparmor.d" / "zviz"
    assert node(root, "install") == 0
    assert "apparmor: not present" in capsys.readouterr().out
    assert not profile.exists()
    assert node(root, "uninstall") == 0
    fake_apparmor(root, "N")  # built in but disabled (apparmor=0 on the command line)
    assert node(root, "install") == 0
    assert not profile.exists()
    assert node(root, "uninstall") == 0


def test_where_apparmor_is_active_install_writes_the_userns_profile_and_uninstall_removes_it(
    root, capsys
):
    from runtime.node import install

    fake_apparmor(root, "Y")
    fake_parser_abi(root, "4.0")
    write_config(root, V2_WITHOUT_CRI)
    profile = root / "etc" / "apparmor.d" / "zviz"
    assert node(root, "install", "--dry-run") == 0
    assert f"apparmor: would install {profile}" in capsys.readouterr().out
    assert not profile.exists()
    assert node(root, "install") == 0
    out = capsys.readouterr().out
    assert "allows zviz's user namespaces" in out
    assert "not loaded (--root is not this kernel)" in out
    text = read(str(profile))
    # Ubuntu 24.04's pattern: an unconfined profile attached to the program's real path,
    # with the userns rule that kernel.apparmor_restrict_unprivileged_userns demands.
    assert text.startswith("abi <abi/4.0>,\n")
    # the shim's compiled client, which containerd execs (and its Python entry, exec'd
    # by it, keeps the profile: an unconfined profile's exec without an attachment stays)
    shim = os.path.realpath(root / "usr" / "local" / "bin" / install.SHIM_NAME)
    assert f'profile zviz-shim "{shim}" flags=(unconfined) {{\n  userns,\n}}' in text
    assert "profile zviz-zviz " in text
    assert node(root, "install") == 0
    assert read(str(profile)) == text  # idempotent
    assert node(root, "uninstall") == 0
    assert not profile.exists()


def test_with_apparmor_3_the_profile_attaches_without_the_rule_that_parser_refuses(root, capsys):
    fake_apparmor(root, "Y")
    fake_parser_abi(root, "3.0")
    write_config(root, V2_WITHOUT_CRI)
    assert node(root, "install") == 0
    assert "without the userns rule" in capsys.readouterr().out
    text = read(str(root / "etc" / "apparmor.d" / "zviz"))
    assert text.startswith("abi <abi/3.0>,\n")
    assert "userns" not in text
    assert text.count("flags=(unconfined) {\n}\n") == 2


@pytest.mark.parametrize("abi_4", [False, True], ids=["abi-3.0", "abi-4.0"])
def test_the_profile_parses_with_the_real_apparmor_parser(abi_4):
    """apparmor_parser -Q parses without a kernel. This machine's parser is Debian 12's 3.0:
    the 4.0 text (Ubuntu's runc profile's pattern) is refused by it, so only checked there."""
    import shutil
    import subprocess

    from runtime.node import install

    parser = install.apparmor_parser()
    if parser is None:
        pytest.skip("no apparmor_parser (`make deps` installs apparmor)")
    has_abi_4 = os.path.exists(install.APPARMOR_ABI_4)
    if abi_4 and not has_abi_4:
        pytest.skip(f"this apparmor_parser predates {install.APPARMOR_ABI_4} (the userns rule)")
    client = os.path.join(install.scripts_dir(), "zviz")
    steps = [
        ("shim", "/usr/local/bin/" + install.SHIM_NAME, ("link", client)),
        ("zviz", shutil.which("true"), ("client", "the compiled fork-server client")),
    ]
    done = subprocess.run(
        [parser, "-Q", "-K"],
        input=install._apparmor_profile(steps, abi_4),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "enabled, loaded, restrict, status, detail",
    [
        ("N", None, None, "ok", "not active in this kernel"),
        ("Y", "", None, "ok", "no kernel.apparmor_restrict_unprivileged_userns"),
        ("Y", None, "0", "ok", "loaded profiles unknown"),
        ("Y", "docker-default (enforce)\n", "1", "warn", "no zviz profile loaded: `zviz node"),
        (
            "Y",
            "zviz-shim (unconfined)\nzviz-zviz (unconfined)\n",
            "1",
            "ok",
            "= 1; zviz's profiles loaded: zviz-shim (unconfined), zviz-zviz (unconfined)",
        ),
    ],
)
def test_node_check_reports_apparmor(root, enabled, loaded, restrict, status, detail):
    from runtime.node import check

    fake_apparmor(root, enabled, loaded, restrict)
    result = check._apparmor(str(root))
    assert (result.name, result.status) == ("apparmor", status), result
    assert detail in result.detail
