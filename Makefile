# zviz: the two commands a new machine needs are `make demo` and `make test`.
# Both run as root and install what they need first (Debian packages, a venv).
VENV    := .venv
PY      := $(VENV)/bin/python
ZVIZ    := $(VENV)/bin/zviz
BUILD   := _build
# debootstrap: the workload suite's Debian images (tools/debimage.py); git: its CI job's repository.
# containernetworking-plugins and dnsmasq-base: the CRI tests' pod network and DNS server
# (integration/cni_node.py). dnsmasq-base is Debian's dnsmasq binary without the `dnsmasq`
# package's system service, which would start a resolver on the host's port 53 at install.
# apparmor: apparmor_parser, which `zviz node install` loads its profile with (its service
# does nothing on a kernel without the LSM, like this one; the 6.1 guest's has it).
# libseccomp-dev: `make tools` builds runc with seccomp (tools/gotools.py).
DEB_PKGS := containerd runc runsc busybox-static libseccomp2 libseccomp-dev iproute2 cpio gcc libc6-dev \
            qemu-system-x86 linux-image-amd64 golang-github-containerd-containerd-dev \
            containernetworking-plugins dnsmasq-base apparmor debootstrap git

.PHONY: install deps venv tools images demo test test-fast soak lint bench proto dist clean conformance

install: deps venv
	@# Bytecode ahead of time: the environment may forbid writing it at run time, and
	@# recompiling on every start costs the CLI and the shim milliseconds per container.
	@$(PY) -m compileall -q runtime shim api tools >/dev/null
	@# `zviz` and `containerd-shim-zviz-v2` become the compiled fork-server clients (pip's
	@# scripts stay as zviz-python and containerd-shim-zviz-v2-python, which they run for
	@# everything they do not serve): no interpreter start per `zviz run` or shim `start`.
	@$(PY) -m runtime.forkserver --build-client $(VENV)/bin
	@# The static programs (runtime/static_programs.py): the exec anchor PID 1 forks
	@# (without it execs keep a Landlock domain of their own and cannot reach PID 1's
	@# /proc entries) and the seccomp broker's warden (without it each broker forks a
	@# Python warden, ~1 MiB more a container).
	@$(PY) -m runtime.static_programs --build $(VENV)/bin

# Debian packages: skipped when all are present, so repeated runs cost nothing.
deps:
	@missing=$$(for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Builds the embedded busybox bundle locally and runs it under zviz, showing
# what the container sees.
demo: install
	$(PY) -m tools.mkbundle $(BUILD)/demo-bundle --demo
	$(ZVIZ) --root $(BUILD)/state run --bundle $(BUILD)/demo-bundle zviz-demo-$$$$

# containerd 2.x (+ ctr), a current runc for its CRI's reference handler, and nerdctl, built with Go at the versions tools/gotools.py pins,
# cached in /var/cache/zviz-tools across runs; without `go` their tests skip.
tools:
	python3 -m tools.gotools

# The OCI conformance suite (runtime-tools' validation programs) under zviz and runc, side
# by side, with each program's TAP output kept in _build/conformance (tools/conformance.py).
conformance: install tools
	$(PY) -m tools.conformance --logs $(BUILD)/conformance

# The workload suite's Debian images (nginx, Redis, PostgreSQL, Python, Node.js, a CI job), built with
# debootstrap from Debian's packages and cached in /var/cache/zviz-tools/images; a failed
# build fails the target (integration/workloads/ builds any missing one the same way).
images: deps
	python3 -m tools.debimage

test: install tools images
	$(PY) -m pytest -q tests integration

test-fast: venv
	$(PY) -m pytest -q tests

# The long soak (integration/reliability/soak.py, not collected by `make test`): cycles
# through containerd, then many containers at once. ZVIZ_SOAK_CYCLES (default 1000) and
# ZVIZ_SOAK_PARALLEL (default 50, up for ZVIZ_SOAK_SECONDS, default 180) set its size;
# -s prints its figures (docs/reliability.md).
soak: install
	$(PY) -m pytest -q -s integration/reliability/soak.py

lint: venv
	$(VENV)/bin/ruff check runtime shim api tests integration tools bench
	$(VENV)/bin/ruff format --check runtime shim api tests integration tools bench

bench: install
	$(PY) -m bench

# The product: dist/zviz-VERSION.tar.gz and the wheel built from it (tools/dist.py).
dist: venv
	$(PY) -m tools.dist dist

proto: venv
	$(PY) -m api.protogen

clean:
	rm -rf $(BUILD) $(VENV) dist *.egg-info
