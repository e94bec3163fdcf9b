"""The library API both the `zviz` CLI and the shim use: one container's whole life.

    c = Container.create(root, id, bundle, ...)   # creating -> created
    c.start()                                     # created -> running
    c.state(); c.kill(sig); c.pause(); c.resume(); c.exec(process)
    c.record_exit(wait_status)                    # by whoever reaps PID 1
    c.delete(force=...)                           # -> gone: no cgroup, no state dir

Nothing outlives a failed create: the cgroup and the state directory are removed
and every process started is killed. Mounts live in the container's own mount
namespace and vanish with its last process.
"""

import os
import select
import signal
import time

from runtime import errors, linux, state
from runtime.log import NULL as NULL_LOG
from runtime.private_dir import makedirs_private
from runtime.spawn import parent, sysctl
from runtime.spawn.common import Request

# How long delete waits for killed processes to leave before failing.
_KILL_WAIT_S = 10.0


class Container:
    def __init__(self, root: str, container_id: str, data: dict, log=NULL_LOG):
        self.root = root
        self.id = container_id
        self.dir = state.container_dir(root, container_id)
        self.data = data
        self.log = log
        self._spawned: parent.Spawned | None = None
        self._cgroup = None
        # Set by create(), from the validated config.json, for the caller (the shim) that
        # would otherwise read config.json again: PID 1's user as {"uid", "gid"}, and
        # whether the container has a pid namespace of its own, the profile it runs under,
        # and config.json's annotations (the pod's names for denial records).
        self.init_user: dict | None = None
        self.own_pid_namespace: bool | None = None
        self.profile = None
        self.annotations: dict[str, str] = {}

    # --- creation -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str,
        container_id: str,
        bundle: str,
        *,
        profile=None,  # a name or file (--profile), a selection.ProfilePolicy (the shim's), or None
        host_ids=None,  # Profile -> Profile with the caller's own host id range (the shim's pool)
        verbose: bool = False,
        console_socket: str | None = None,
        pid_file: str | None = None,
        stdio=(0, 1, 2),
        notify_socket: str | None = None,
        detach: bool = True,
        preserve_fds: int = 0,
        no_pivot: bool = False,
        allow_host_network: bool = False,
        host_network_switch: str | None = None,
        cluster_network=None,
        log=NULL_LOG,
    ) -> "Container":
        """Build the container up to PID 1 waiting to exec.

        detach=True: PID 1 waits on the exec fifo; any process may `start` it later,
        and PID 1 is reaped by the caller's subreaper (the shim), not by zviz.
        detach=False: the caller is PID 1's reaper (this makes it a subreaper) and
        must call start() on this same object: no fifo, one message instead.
        The profile is resolved here (security.resolve_profile); `host_ids` is asked only
        when the container's ids would be the profile's range (security.maps_profile_ids).
        """
        del notify_socket  # accepted for runc compatibility; zviz has no sd_notify support
        directory = state.container_dir(root, container_id)
        bundle = os.path.abspath(bundle)
        try:
            makedirs_private(root)
        except OSError as exc:
            raise errors.state_error(f"creating {root}", exc) from exc
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            raise errors.AlreadyExists(f"container {container_id!r} already exists") from None
        except OSError as exc:
            raise errors.state_error(f"creating {directory}", exc) from exc
        container = cls(root, container_id, {}, log)
        cg = None
        channel = None
        fds: list[int] = []
        steps = _Steps(log, f"create {container_id}")
        try:
            from runtime.spec import load_spec

            spec = load_spec(bundle)
            steps.done("config.json loaded")
            if spec.process is None:
                raise errors.field_error("process", "is required to create a container")
            resolved_profile, changes = _harden(
                spec,
                profile,
                allow_host_network,
                host_network_switch,
                cluster_network,
                host_ids=host_ids,
            )
            steps.done(f"profile {resolved_profile.name} resolved, spec hardened")
            # What the profile changed in config.json, for `--debug`: why a program that
            # asked for a capability or a shared namespace finds it gone.
            for change in changes:
                log.info(f"profile {resolved_profile.name}: {change}")
            _validate(spec, detach, console_socket)
            data = {
                "ociVersion": spec.oci_version,
                "id": container_id,
                "pid": 0,
                "pidStartTime": None,
                "bundle": bundle,
                "rootfs": spec.root.path,
                "created": state.now_rfc3339(),
                "annotations": dict(spec.annotations or {}),
                "owner": "",
                # A name for built-ins, the file's path otherwise: exec loads it again.
                "profile": getattr(resolved_profile, "ref", profile),
                # Not always the file's (the operator's or an annotation's): exec keeps it.
                "profileMode": getattr(resolved_profile, "mode", "enforce"),
                "verbose": verbose,
                "status": "creating",
            }
            if allow_host_network:
                data["allowHostNetwork"] = True  # exec hardens the same spec again
            if cluster_network:
                data["clusterNetwork"] = cluster_network.to_state()
            if resolved_profile.egress_nameservers:
                data["egressNameservers"] = [list(s) for s in resolved_profile.egress_nameservers]
            # What start and delete (maybe other processes) run; the rest runs in create.
            later_hooks = {k: v for k, v in (spec.hooks or {}).items() if k in _LATER_HOOKS and v}
            if later_hooks:
                data["hooks"] = later_hooks
            from runtime import cgroups

            cg = cgroups.for_container(container_id, spec.linux.cgroups_path)
            data["cgroupPaths"] = dict(cg.paths)
            container.data = data
            # Before the groups exist: whoever deletes after a crash here knows them.
            state.write(directory, data)
            cg.create()
            cg.prepare_join()
            cg.apply(spec.linux.resources)
            steps.done("cgroups made, limits applied")

            fifo_fd = None
            if detach:
                fifo = os.path.join(directory, state.EXEC_FIFO)
                os.mkfifo(fifo, 0o622)
                # mkfifo honours the umask: make the fifo writable for a non-root PID 1.
                os.chmod(fifo, 0o622)
                fifo_fd = os.open(fifo, os.O_PATH | os.O_CLOEXEC)
                fds.append(fifo_fd)
            console_fd = None
            if console_socket and spec.process.terminal:
                from runtime import console

                console_fd = console.connect(console_socket)
                fds.append(console_fd)
            if not detach:
                linux.set_child_subreaper()
            channel = _notify_channel(resolved_profile, verbose)
            from runtime import exec_anchor

            anchor_fds = exec_anchor.prepare(directory, spec, log)
            if anchor_fds is not None:
                fds.extend(anchor_fds)
            request = Request(
                spec,
                bundle=bundle,
                notify_channel=channel,
                profile=resolved_profile,
                verbose=verbose,
                cgroup=cg,
                wait_for_fifo_fd=fifo_fd,
                console_fd=console_fd,
                stdio=stdio,
                preserve_fds=preserve_fds,
                no_pivot=no_pivot,
                hook_state=_hook_template(data),
                anchor_fds=anchor_fds,
            )
            sysctl.write_joined_netns_sysctls(spec)
            spawned = parent.spawn_init(request, log)
            steps.done(f"PID 1 ({spawned.pid}) ready: namespaces, id maps, rootfs")
            data["pid"] = spawned.pid
            data["pidStartTime"] = spawned.start_time
            data["status"] = "created"
            try:
                if channel is not None:
                    _start_broker(
                        channel,
                        spawned.pid,
                        resolved_profile,
                        verbose,
                        container_id,
                        log,
                        cg,
                        _denial_records(directory, container_id, resolved_profile, data),
                    )
                    steps.done("broker started")
                state.write(directory, data)
                if pid_file:
                    write_pid_file(pid_file, spawned.pid)
                if detach:
                    spawned.sync.send("ack")
            except BaseException:
                spawned.sync.close()
                parent._kill(spawned.pid)
                raise
            if detach:
                spawned.sync.close()
            else:
                container._spawned = spawned
            container._cgroup = cg
            user = spec.process.user
            container.init_user = {"uid": user.uid, "gid": user.gid}
            container.own_pid_namespace = spec.linux.creates_namespace("pid")
            container.profile = resolved_profile
            container.annotations = dict(spec.annotations)
            steps.finish()
            return container
        except BaseException as failure:
            _close_quietly(fds)
            fds.clear()
            _close_channel(channel)
            container._undo_create(cg, failure)
            raise
        finally:
            _close_quietly(fds)
            _close_channel(channel)

    def _undo_create(self, cg, failure: BaseException) -> None:
        """Remove what a failed create made. FAILURE stays the error create raises (a
        state dir that cannot be removed no longer replaces it); a step that fails too is
        carried beside it (errors.carry_cleanup_error) and the next step still runs."""
        steps = [] if cg is None else [("removing the cgroup", cg.destroy)]
        steps.append(("removing the state directory", lambda: _remove_state_dir(self.dir)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - carried beside the failure
                self.log.warning(f"cleanup after failed create: {what}: {exc}")
                errors.carry_cleanup_error(failure, exc)

    @classmethod
    def load(cls, root: str, container_id: str, log=NULL_LOG) -> "Container":
        return cls(root, container_id, state.read(root, container_id), log)

    @staticmethod
    def list_all(root: str, log=NULL_LOG) -> list["Container"]:
        found = []
        for container_id in state.list_ids(root):
            try:
                found.append(Container.load(root, container_id, log))
            except errors.NotFound:
                continue  # deleted while we listed
        return found

    # --- status ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.data.get("pid") or 0

    def cgroup(self):
        if self._cgroup is None and self.data.get("cgroupPaths"):
            from runtime import cgroups

            self._cgroup = cgroups.load(self.data["cgroupPaths"])
        return self._cgroup

    def status(self) -> str:
        data = self.data
        if data.get("exitStatus") is not None:
            return "stopped"
        if not self.pid:
            return (
                "creating"
                if data.get("status") == "creating" and _creator_may_live(data)
                else "stopped"
            )
        stat = state.proc_stat(self.pid)
        if stat is None or stat.start_time != data.get("pidStartTime"):
            return "stopped"
        if stat.state in ("Z", "X"):
            if stat.exit_code is not None and data.get("exitStatus") is None:
                data["exitStatus"] = state.exit_code_from_wait_status(stat.exit_code)
            return "stopped"
        if os.path.exists(os.path.join(self.dir, state.EXEC_FIFO)):
            return "created"
        cg = self.cgroup()
        try:
            if cg is not None and cg.frozen():
                return "paused"
        except (OSError, errors.ZvizError):
            pass
        return "running"

    def state(self) -> dict:
        """OCI state JSON (runc's shape), plus exitStatus/oomKilled when known."""
        status = self.status()
        data = self.data
        result = {
            "ociVersion": data.get("ociVersion", "1.2.0"),
            "id": self.id,
            "pid": self.pid if status != "stopped" else 0,
            "status": status,
            "bundle": data.get("bundle", ""),
            "rootfs": data.get("rootfs", ""),
            "created": data.get("created", ""),
            "owner": data.get("owner", ""),
        }
        if data.get("annotations"):
            result["annotations"] = data["annotations"]
        if status == "stopped" and data.get("exitStatus") is not None:
            result["exitStatus"] = data["exitStatus"]
        if status == "stopped" and not data.get("oomKilled"):
            data["oomKilled"] = self._oom_kills() > 0
        if data.get("oomKilled"):
            result["oomKilled"] = True
        return result

    def record_exit(self, wait_status: int, persist: bool = True) -> int:
        """Record PID 1's wait status (the reaper calls this); returns the exit code.

        persist=False: only in memory, for a caller that deletes the container next.
        """
        code = state.exit_code_from_wait_status(wait_status)
        self.data["exitStatus"] = code
        self.data["oomKilled"] = self._oom_kills() > 0
        if persist:
            self._save()
        return code

    def _oom_kills(self) -> int:
        """OOM kills in the container's cgroup (0 when unknown)."""
        cg = self.cgroup()
        try:
            return cg.oom_kill_count() if cg is not None else 0
        except (OSError, errors.ZvizError):
            return 0

    @property
    def oom_killed(self) -> bool:
        return bool(self.data.get("oomKilled"))

    def _save(self) -> None:
        if os.path.isdir(self.dir):
            state.write(self.dir, self.data)

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """created -> running: PID 1 applies the security layers and execs the workload."""
        if self._spawned is not None:
            spawned, self._spawned = self._spawned, None
            spawned.sync.send("start")
            parent.wait_exec_result(spawned)
            self._run_later_hooks("poststart", "running")
            return
        status = self.status()
        if status != "created":
            raise errors.FailedPrecondition(
                f"container {self.id!r} is {status}, not created: cannot start"
            )
        fifo = os.path.join(self.dir, state.EXEC_FIFO)
        # PID 1 pinned before the fifo lets it run: a workload that exits at once may be
        # reaped (by the shim's loop, in another thread) before a pidfd taken after it.
        pidfd = self._pidfd()
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            os.close(pidfd)
            raise errors.FailedPrecondition(f"container {self.id!r} was already started") from None
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP)
            poller.register(pidfd, select.POLLIN)
            while True:
                events = dict(poller.poll())
                if fd in events:
                    if os.read(fd, 1) == b"0":
                        break
                    raise errors.FailedPrecondition(
                        f"container {self.id!r}: init exited before it could start"
                    )
                if pidfd in events:
                    raise errors.FailedPrecondition(
                        f"container {self.id!r}: init exited before it could start"
                    )
        finally:
            os.close(fd)
            os.close(pidfd)
        os.unlink(fifo)
        self._run_later_hooks("poststart", "running")

    def _run_later_hooks(self, kind: str, status: str) -> None:
        """poststart, poststop: a failing hook is a warning (runtime spec)."""
        if self.data.get("hooks", {}).get(kind):
            from runtime import hooks

            container_state = hooks.state(_hook_template(self.data), status, self.pid)
            hooks.run_warning_only(kind, self.data["hooks"], container_state, self.log)

    def _pidfd(self) -> int:
        """A pidfd of PID 1, verified to be our process (not a recycled pid)."""
        try:
            pidfd = linux.pidfd_open(self.pid)
        except OSError:
            raise errors.FailedPrecondition(
                f"container {self.id!r}: container not running"
            ) from None
        stat = state.proc_stat(self.pid)
        if stat is None or stat.start_time != self.data.get("pidStartTime"):
            os.close(pidfd)
            raise errors.FailedPrecondition(f"container {self.id!r}: container not running")
        return pidfd

    def kill(self, sig: int, all: bool = False) -> None:  # noqa: A002 - runc's flag name
        status = self.status()
        if all:
            cg = self.cgroup()
            if cg is not None:
                cg.kill_all(sig)
            if status == "stopped":
                return
        if status == "stopped":
            raise errors.FailedPrecondition(f"container {self.id!r}: container not running")
        pidfd = self._pidfd()
        try:
            linux.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            raise errors.FailedPrecondition(
                f"container {self.id!r}: container not running"
            ) from None
        finally:
            os.close(pidfd)
        if status == "paused" and sig == signal.SIGKILL and not all:
            cg = self.cgroup()
            if cg is not None:
                cg.thaw()

    def delete(self, force: bool = False) -> None:
        """Kill what is left (created always, running/paused only with force), remove everything."""
        status = self.status()
        if status in ("running", "paused") and not force:
            raise errors.FailedPrecondition(
                f"cannot delete container {self.id} that is not stopped: {status} (use --force)"
            )
        if status in ("created", "running", "paused"):
            try:
                pidfd = self._pidfd()
            except errors.FailedPrecondition:
                pidfd = -1
            try:
                if pidfd >= 0:
                    try:
                        linux.pidfd_send_signal(pidfd, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                cg = self.cgroup()
                if cg is not None:
                    cg.kill_all(signal.SIGKILL)
                if pidfd >= 0:
                    _wait_readable(pidfd, _KILL_WAIT_S)
            finally:
                if pidfd >= 0:
                    os.close(pidfd)
            parent.reap_if_child(self.pid)
        cg = self.cgroup()
        if cg is not None:
            cg.destroy()
        _remove_state_dir(self.dir)
        state.remove_learning_profile(self.root, self.id)
        self._run_later_hooks("poststop", "stopped")

    def pause(self) -> None:
        status = self.status()
        if status != "running":
            raise errors.FailedPrecondition(
                f"container {self.id!r} is {status}, not running: cannot pause"
            )
        self._require_cgroup().freeze()

    def resume(self) -> None:
        status = self.status()
        if status != "paused":
            raise errors.FailedPrecondition(
                f"container {self.id!r} is {status}, not paused: cannot resume"
            )
        self._require_cgroup().thaw()

    def _require_cgroup(self):
        cg = self.cgroup()
        if cg is None:
            raise errors.FailedPrecondition(f"container {self.id!r} has no cgroup")
        return cg

    def pids(self) -> list[int]:
        cg = self.cgroup()
        if cg is None:
            return []
        try:
            return cg.pids()
        except (FileNotFoundError, errors.NotFound):
            return []

    def stats(self) -> dict:
        return self._require_cgroup().stats()

    def update(self, resources: dict, source: str = "update") -> None:
        """Apply new linux.resources (`zviz update`, the shim's Update): validated by the
        rules config.json's are (spec.parse_resources), errors naming the field after
        `source`; nothing is written unless all of it passes."""
        from runtime.spec import parse_resources

        typed = parse_resources(resources, source)
        cg = self._require_cgroup()
        if self.data.get("profile"):
            from runtime import security

            # The profile's pids/memory ceilings hold after create too.
            security.check_resources(security.resolve_profile(self.data["profile"]), typed)
        cg.apply(typed)

    # --- exec -----------------------------------------------------------------------

    def _cluster_network(self):
        """The operator's cluster network this container was created with (or None)."""
        if not self.data.get("clusterNetwork"):
            return None
        from runtime.security.cluster import ClusterNetwork

        return ClusterNetwork.from_state(self.data["clusterNetwork"])

    def exec(
        self,
        process_config: dict,
        *,
        stdio=(0, 1, 2),
        console_socket: str | None = None,
        pid_file: str | None = None,
        detach: bool = True,
        preserve_fds: int = 0,
    ) -> int:
        """Run another process in the container; returns its host pid once it exec'd.

        detach=False makes the caller a subreaper: it reaps the process itself.
        """
        status = self.status()
        if status not in ("created", "running"):
            raise errors.FailedPrecondition(f"container {self.id!r} is {status}: cannot exec")
        from runtime.spec import check_process_in_spec, load_spec, parse_process

        spec = load_spec(self.data["bundle"])
        resolved_profile, _ = _harden(
            spec,
            self.data.get("profile"),
            bool(self.data.get("allowHostNetwork")),
            cluster_network=self._cluster_network(),
            egress_nameservers=self.data.get("egressNameservers") or (),
            mode=self.data.get("profileMode"),
        )
        exec_process = parse_process(process_config)
        check_process_in_spec(exec_process, spec)
        pid1_process = spec.process
        if exec_process.user.umask is None:
            # runc's exec takes the container's umask (runtime/spawn/init.workload_umask).
            exec_process.user.umask = pid1_process.user.umask
        spec.process = exec_process
        fds = []
        channel = None
        try:
            anchor_connection = self._exec_anchor(
                status, exec_process, pid1_process, resolved_profile, preserve_fds
            )
            console_fd = None
            if console_socket and exec_process.terminal:
                from runtime import console

                # One connection for both tries: the caller gets one pty, from the try
                # that runs the exec (an unanswered anchor never got to make one).
                console_fd = console.connect(console_socket)
                fds.append(console_fd)
            if not detach:
                linux.set_child_subreaper()

            def spawn(anchor_connection):
                nonlocal channel
                if anchor_connection is None:  # else PID 1's broker serves it, as its children
                    channel = _notify_channel(resolved_profile, bool(self.data.get("verbose")))
                request = Request(
                    spec,
                    bundle=self.data["bundle"],
                    notify_channel=channel,
                    profile=resolved_profile,
                    verbose=bool(self.data.get("verbose")),
                    cgroup=self.cgroup(),
                    console_fd=console_fd,
                    stdio=stdio,
                    preserve_fds=preserve_fds,
                    anchor_connection=anchor_connection,
                )
                return parent.spawn_exec(request, self.pid, exec_process, self.log)

            spawned = None
            if anchor_connection is not None:
                from runtime import exec_anchor

                try:
                    spawned = spawn(anchor_connection)
                except exec_anchor.Unanswered as e:
                    # Nothing of the exec ran (the workload may stop or kill the anchor).
                    self.log.info(f"exec: a Landlock domain of its own: {e}")
                finally:
                    _close_quietly(anchor_connection)
            if spawned is None:
                spawned = spawn(None)
        except BaseException:
            _close_channel(channel)
            raise
        finally:
            _close_quietly(fds)
        try:
            if channel is not None:
                _start_broker(
                    channel,
                    spawned.pid,
                    resolved_profile,
                    bool(self.data.get("verbose")),
                    self.id,
                    self.log,
                    self.cgroup(),
                    _denial_records(self.dir, self.id, resolved_profile, self.data),
                )
            if pid_file:
                write_pid_file(pid_file, spawned.pid)
        except BaseException:
            spawned.sync.close()
            parent._kill(spawned.pid)
            raise
        finally:
            _close_channel(channel)
        spawned.sync.send("start")
        parent.wait_exec_result(spawned)
        return spawned.pid

    def _exec_anchor(
        self, status, exec_process, pid1_process, profile, preserve_fds
    ) -> tuple[int, int, int] | None:
        """exec_anchor.connect's fds when the exec may go through the container's exec
        anchor (runtime/exec_anchor.py); None, logged why, for the old path: a Landlock
        domain of its own, a sibling of PID 1's."""
        from runtime import exec_anchor

        if status != "running":  # PID 1 forks the anchor at start
            why = f"the container is {status}: no exec anchor yet"
        else:
            why = exec_anchor.ineligible(exec_process, pid1_process, profile, preserve_fds)
        if why is None:
            try:
                return exec_anchor.connect(self.dir, self.pid)
            except OSError as e:
                why = f"no exec anchor ({e.strerror or e})"
        self.log.info(f"exec: a Landlock domain of its own: {why}")
        return None


_LATER_HOOKS = ("poststart", "poststop")


def _hook_template(data: dict) -> dict:
    """The state fields every OCI hook reads besides status and pid."""
    return {key: data[key] for key in ("ociVersion", "id", "bundle", "annotations")}


def _harden(
    spec,
    profile,
    allow_host_network: bool = False,
    host_network_switch=None,
    cluster_network=None,
    egress_nameservers=None,
    host_ids=None,
    mode=None,
):
    """Resolve the profile (security.resolve_profile: --profile, the shim's operator
    policy, or the annotation's default rule), in `mode` when given (an exec: the mode
    its container was created in), give it the caller's host id range when
    it maps the container's ids, and let the security layer tighten the spec:
    (profile, what the hardening changed in config.json)."""
    from runtime import security
    from runtime.security.profiles import with_mode

    profile = with_mode(security.resolve_profile(profile, spec.annotations), mode)
    if host_ids is not None and security.maps_profile_ids(spec, profile):
        profile = host_ids(profile)
    changes = security.harden_spec(
        spec,
        profile,
        allow_host_network=allow_host_network,
        host_network_switch=host_network_switch or security.HOST_NETWORK_FLAG,
        cluster_network=cluster_network,
        egress_nameservers=egress_nameservers,
    )
    return profile, changes


def _notify_channel(profile, verbose: bool):
    """The seccomp broker's channel when the profile mediates syscalls (else None)."""
    from runtime import security

    return security.notify_channel(profile, verbose)


class _Steps:
    """`--debug`: each step of a create, with what it took (the log drops them otherwise)."""

    def __init__(self, log, what: str):
        self.log = log
        self.what = what
        self.start = self.last = time.monotonic()

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.log.debug(f"{self.what}: {step} ({(now - self.last) * 1000:.1f} ms)")
        self.last = now

    def finish(self) -> None:
        self.log.debug(f"{self.what}: done in {(time.monotonic() - self.start) * 1000:.1f} ms")


def _denial_records(directory: str, container_id: str, profile, data: dict):
    """Where the broker writes its refusals and what each record says of the container
    (None when denial records are switched off: runtime/denials.py)."""
    from runtime import denials

    if not denials.enabled():
        return None
    context = denials.context(container_id, profile.name, data.get("annotations"))
    return denials.path_in(directory), context


def _start_broker(
    channel, pid: int, profile, verbose: bool, container_id: str, log, cgroup, records=None
) -> None:
    """Hand the supervisor end to a broker process; the container end stays with PID 1.

    What the broker copies from the container is charged to the container's memory
    limit: it joins the container's memory cgroup before the container can make a call.
    """
    from runtime import security

    channel.close_container_end()
    broker_pid = security.start_broker(
        channel,
        pid,
        profile,
        verbose=verbose,
        container_id=container_id,
        log_path=getattr(log, "path", None),
        records_path=records[0] if records else None,
        record_context=records[1] if records else None,
    )
    if cgroup is not None:
        cgroup.charge_memory(broker_pid)


def _validate(spec, detach: bool, console_socket: str | None) -> None:
    """What config.json alone cannot decide (runtime/spec.py checked the rest)."""
    if spec.process.terminal and detach and not console_socket:
        raise errors.InvalidArgument(
            "config.json: process.terminal is true: a detached container needs --console-socket"
        )


def write_pid_file(path: str, pid: int) -> None:
    """Atomically, as runc: go-runc reads it as soon as the command returns.

    The directory may be shared (/tmp): the temporary file gets a name nobody can
    guess in advance and is created O_EXCL|O_NOFOLLOW, so a planted symlink never
    makes root truncate another file; rename() replaces a symlink at `path` itself.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(6).hex()}.zviz-tmp"
    )
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
        )
    except OSError as exc:
        # the caller undoes the create: the user's typo must read as one, not a traceback
        raise errors.InvalidArgument(f"--pid-file {path}: {exc.strerror}") from exc
    try:
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise errors.InvalidArgument(f"--pid-file {path}: {exc.strerror}") from exc
        raise


def _wait_readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout_s * 1000)))


def _remove_state_dir(directory: str) -> None:
    """rm -r of a container's flat state dir (no shutil: ~2 ms of import per command)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass


def _close_channel(channel) -> None:
    if channel is not None:
        channel.close_container_end()
        channel.close_supervisor_end()


def _close_quietly(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _creator_may_live(data: dict) -> bool:
    """A `creating` record is only trusted briefly: a crashed creator leaves one behind."""
    try:
        created = time.mktime(time.strptime(data.get("created", "")[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return False
    return time.time() - (created - time.timezone) < 60
