"""Profile learning's pure part (runtime/security/learn.py): records and rootfs scans in,
the smallest extending profile out, and that profile loads as what it says."""

import os

from runtime.security import learn
from runtime.security.learn_run import opened_up
from runtime.security.profiles import load_profile


def _seccomp(syscall, verdict="audit"):
    return {"source": "seccomp", "syscall": syscall, "verdict": verdict}


def _broker(syscall, address, verdict="audit"):
    return {
        "source": "broker",
        "syscall": syscall,
        "verdict": verdict,
        "args": {"family": "AF_INET", "address": address},
    }


def _write_and_load(tmp_path, text):
    path = tmp_path / "learned.toml"
    path.write_text(text)
    return load_profile(str(path))


def test_audited_syscalls_are_learned_and_nothing_beyond():
    base = load_profile("ci-runner")
    records = [
        _seccomp("kcmp"),
        _seccomp("kcmp"),
        _seccomp("unshare", "EPERM"),  # escape class: stays refused
        _seccomp("bpf", "audit"),  # even if a record said so: never
        _seccomp("socket"),  # argument-filtered: the family is not in the record
        _seccomp("syscall_5(arch 0x40000003)", "killed"),
    ]
    learned = learn.from_records(records, base)
    assert learned.syscalls == {"kcmp"}
    assert "escape class" in learned.not_learned["unshare"]
    assert "escape class" in learned.not_learned["bpf"]
    assert "arguments" in learned.not_learned["socket"]


def test_syscall_names_survive_the_rate_limit_summary():
    base = load_profile("ci-runner")
    summary = {
        "source": "rate-limit",
        "verdict": "suppressed",
        "counts": {"seccomp fanotify_mark audit": 500, "broker connect audit": 3},
    }
    learned = learn.from_records([summary], base)
    assert learned.syscalls == {"fanotify_mark"}
    assert any("rate limit" in why for why in learned.not_learned.values())


def test_the_learned_profile_extends_the_base_and_grants_exactly_that(tmp_path):
    base = load_profile("ci-runner")
    learned = learn.from_records([_seccomp("kcmp"), _broker("connect", "198.51.100.7:9000")], base)
    learned.writable = {"/srv/data", "/srv/data/sub", "/tmp/x", "/opt/app"}
    plan = learn.plan(learned, base, "ci-runner", "mine")
    text = learn.to_toml(plan, ["a header"])
    profile = _write_and_load(tmp_path, text)
    assert profile.name == "mine"
    assert "kcmp" in profile.allow and "kcmp" not in profile.deny
    # Only what was seen: the rest of the base's deny list is kept.
    assert set(base.deny) - set(profile.deny) == {"kcmp"}
    assert set(profile.allow) - set(base.allow) == {"kcmp"}
    # The smallest set of directories: nested ones and the base's writable paths dropped.
    assert set(profile.writable) - set(base.writable) == {"/srv/data", "/opt/app"}
    # mode "none" cannot carry egress rules: the learned profile mediates instead.
    assert profile.network == "namespace"
    assert profile.egress_allows("198.51.100.7", 9000)
    assert not profile.egress_allows("198.51.100.7", 9001)
    assert not profile.egress_allows("198.51.100.8", 9000)
    assert {"connect", "sendto", "sendmsg"} <= set(profile.mediate)
    assert profile.capabilities == base.capabilities


def test_egress_deny_and_refusals_are_never_learned(tmp_path):
    base = load_profile("web-server")
    records = [
        _broker("connect", "10.0.0.1:80"),  # web-server's egress_deny: its "never"
        _broker("connect", "198.51.100.7:22", verdict="EPERM"),  # refused, not audited
        _broker("connect", "/run/some.sock"),
        _broker("bind", "0.0.0.0:8081"),
        _broker("sendto", "[2001:db8::1]:53"),
    ]
    learned = learn.from_records(records, base)
    plan = learn.plan(learned, base, "web-server", "mine")
    network = plan.tables["network"]
    assert network["egress_add"] == [{"cidr": "2001:db8::1/128", "ports": [53]}]
    assert "tcp_connect_add" not in network  # 53 is in web-server's tcp_connect already
    assert network["bind_add"] == [{"cidr": "0.0.0.0/32", "ports": [8081]}]
    assert network["tcp_bind_add"] == [8081]
    assert "mode" not in network
    assert "refused even in audit mode" in learned.not_learned["connect 198.51.100.7:22"]
    profile = _write_and_load(tmp_path, learn.to_toml(plan, []))
    assert profile.bind_allows("0.0.0.0", 8081)
    assert not profile.egress_allows("10.0.0.1", 80)


def test_nothing_learned_is_the_base_itself(tmp_path):
    base = load_profile("web-server")
    plan = learn.plan(learn.from_records([], base), base, "web-server", "same")
    profile = _write_and_load(tmp_path, learn.to_toml(plan, []))
    assert (profile.allow, profile.deny, profile.writable) == (base.allow, base.deny, base.writable)
    assert (profile.egress, profile.bind, profile.network) == (base.egress, base.bind, base.network)


def test_a_path_with_quotes_stays_one_toml_string_and_odd_names_are_not_learned(tmp_path):
    base = load_profile("ci-runner")
    odd = ("/srv/new\nline", "/srv/not-utf8-\udcff")
    learned = learn.Learned(writable={'/srv/a"b\\c', *odd})
    text = learn.to_toml(learn.plan(learned, base, "ci-runner", "q"), [])
    text.encode()  # writable as UTF-8
    profile = _write_and_load(tmp_path, text)
    assert set(profile.writable) - set(base.writable) == {'/srv/a"b\\c'}


def test_written_dirs_from_a_rootfs_scan(tmp_path):
    root = tmp_path / "rootfs"
    for d in ("etc", "srv/data", "srv/untouched", "var/log", "mnt/volume"):
        (root / d).mkdir(parents=True)
    (root / "etc/config").write_text("a")
    (root / "var/log/old").write_text("a")
    (root / "srv/untouched/file").write_text("a")
    (root / "mnt/volume/inside").write_text("a")
    before = learn.snapshot(str(root), skip=("/mnt/volume",))
    assert "/mnt/volume/inside" not in before  # a mount destination's contents are not the rootfs's
    (root / "srv/data/new").mkdir()  # a new entry: its directory changed
    (root / "srv/data/new/deep").write_text("b")
    with open(root / "etc/config", "a") as f:  # a changed file: its directory
        f.write("b")
    os.utime(root / "etc/config", ns=(0, 0))  # mtime set back: ctime still tells
    (root / "var/log/old").unlink()  # a removed file: its directory
    after = learn.snapshot(str(root), skip=("/mnt/volume",))
    written = learn.written_dirs(before, after)
    assert written == {"/srv/data", "/etc", "/var/log"}
    assert learn.smallest_dirs(written | {"/srv/data/new"}, ("/var",)) == ["/etc", "/srv/data"]


def test_the_learning_run_opens_up_the_rootfs_but_not_mounts(tmp_path):
    root = tmp_path / "rootfs"
    for d in ("etc", "usr/bin", "dev", "proc", "sys", "data/volume", "data/other"):
        (root / d).mkdir(parents=True)
    (root / "etc/hosts").write_text("")
    (root / "etc/passwd").write_text("")
    os.symlink("/", root / "escape")
    skip = ("/dev", "/proc", "/sys", "/etc/hosts", "/data/volume")
    assert opened_up(str(root), skip) == ["/data/other", "/etc/passwd", "/usr"]


def test_overlay_written_from_the_upper_layer():
    """A copied-up image directory is not itself written; a new entry counts for the
    nearest directory that existed before; a whiteout (a removal) for its directory."""
    before = {
        "/": (1, 0, True),
        "/root": (2, 0, True),
        "/usr": (3, 0, True),
        "/usr/lib": (4, 0, True),
        "/usr/lib/old.so": (5, 0, False),
        "/etc": (6, 0, True),
        "/etc/conf": (7, 0, False),
    }
    upper_before = {"/": (100, 1, True), "/etc": (101, 1, True)}  # the runtime's copy-up
    upper_after = {
        "/": (100, 2, True),
        "/etc": (101, 1, True),
        "/root": (102, 2, True),  # copied up: what was written is beneath
        "/root/greet": (103, 2, True),  # new
        "/root/greet/deep": (104, 2, False),
        "/usr": (105, 2, True),
        "/usr/lib": (106, 2, True),
        "/usr/lib/old.so": (107, 2, False),  # a whiteout: removed
    }
    assert learn.overlay_written(before, upper_before, upper_after) == {"/root", "/usr/lib"}


def _udp4(src, sport, dst, dport, payload):
    import ipaddress
    import struct

    header = bytes([0x45, 0]) + struct.pack("!H", 28 + len(payload)) + bytes(5) + bytes([17])
    header += bytes(2) + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    return header + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _dns(query_id, name, reply, addresses=()):
    import ipaddress
    import struct

    from runtime.security import dns

    question = dns.encode_name(name) + struct.pack("!HH", 1, 1)
    flags = 0x8180 if reply else 0x0100
    message = struct.pack("!HHHHHH", query_id, flags, 1, len(addresses), 0, 0) + question
    for address in addresses:
        data = ipaddress.ip_address(address).packed
        kind = 1 if len(data) == 4 else 28
        message += b"\xc0\x0c" + struct.pack("!HHIH", kind, 1, 60, len(data)) + data
    return message


def test_dns_names_only_from_answers_to_questions_seen():
    from runtime.security.learn_dns import DnsNames

    names = DnsNames()
    ask = _dns(7, "svc.example.test", reply=False)
    names.packet(_udp4("10.0.0.5", 40000, "10.0.0.53", 53, ask))
    answer = _dns(7, "svc.example.test", reply=True, addresses=("192.0.2.1", "2001:db8::1"))
    names.packet(_udp4("10.0.0.53", 53, "10.0.0.5", 40000, answer))
    # Unasked, another ID, or from another server: ignored.
    names.packet(_udp4("10.0.0.53", 53, "10.0.0.5", 40000,
                       _dns(8, "svc.example.test", reply=True, addresses=("192.0.2.2",))))  # fmt: skip
    names.packet(_udp4("10.0.0.99", 53, "10.0.0.5", 40000,
                       _dns(7, "svc.example.test", reply=True, addresses=("192.0.2.3",))))  # fmt: skip
    names.packet(_udp4("10.0.0.53", 53, "10.0.0.5", 40000,
                       _dns(7, "other.test", reply=True, addresses=("192.0.2.4",))))  # fmt: skip
    assert names.names == {"192.0.2.1": "svc.example.test", "2001:db8::1": "svc.example.test"}
    assert names.servers == {("10.0.0.53", 53)}


def test_an_address_from_dns_is_learned_as_its_name(tmp_path):
    base = load_profile("web-server")
    learned = learn.from_records(
        [_broker("connect", "198.51.100.7:8081"), _broker("connect", "198.51.100.8:8081")], base
    )
    learned.names = {"198.51.100.7": "api.example.test", "198.51.100.8": "ns.example.test"}
    learned.dns_servers = {("198.51.100.8", 8081)}  # the nameserver: reached as an address
    network = learn.plan(learned, base, "web-server", "n").tables["network"]
    assert network["egress_hosts_add"] == ["api.example.test:8081"]
    assert network["egress_add"] == [{"cidr": "198.51.100.8/32", "ports": [8081]}]
    assert network["tcp_connect_add"] == [8081]
    profile = _write_and_load(
        tmp_path, learn.to_toml(learn.plan(learned, base, "web-server", "n"), [])
    )
    assert ("api.example.test", 8081) in profile.egress_hosts


def test_what_the_container_named_cannot_add_keys_through_a_comment(tmp_path):
    base = load_profile("ci-runner")
    forged = _broker("connect", '/run/x\n[seccomp]\nallow_add = ["kcmp"]\n#')
    plan = learn.plan(learn.from_records([forged], base), base, "ci-runner", "c")
    profile = _write_and_load(tmp_path, learn.to_toml(plan, []))
    assert profile.allow == base.allow and "kcmp" in profile.deny


def test_mount_destinations_beneath_an_image_symlink_are_skipped_where_they_land(tmp_path):
    from runtime.security.learn_run import mount_destinations

    root = tmp_path / "rootfs"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    os.symlink("/run", root / "var/run")
    config = {"mounts": [{"destination": "/var/run/data", "type": "bind", "source": "/x"}]}
    assert mount_destinations(config, str(root)) == ("/var/run/data", "/run/data")
