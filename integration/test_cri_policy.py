"""The operator owns the policy, through containerd's CRI plugin (issue 11, item 3).

Two RuntimeClass handlers served by zviz on one node, each with its own shim config
named by the runtime options' ConfigPath (containerd 1.6 sends it to a non-runc shim as
runtimeoptions.v1.Options, on `start`'s stdin and in CreateTaskRequest.options):

    zviz          profile ci-runner, the annotation may pick ci-runner or hostile-tenant
    zviz-hostile  profile hostile-tenant, the annotation may pick nothing

and the CRI `pod_annotations = ["io.zviz.*"]` for both, so a pod's io.zviz.profile
reaches the OCI spec and the shim's rule is what decides. CRI copies a passed-through
pod annotation into the sandbox's spec too, so a refused profile fails the pod at
RunPodSandbox (the kubelet's FailedCreatePodSandBox event in `kubectl describe pod`),
before any CreateContainer.

What the profiles change observably here: the host ids the pod's root maps to
(ci-runner 100000, hostile-tenant 200000; the pod's containers join the sandbox's
user namespace, so the sandbox's profile is the pod's).
"""

import contextlib

import pytest
from grpclib.exceptions import GRPCError

from integration.test_cri import cri_node, pod, run

HANDLER_CONFIGS = {
    "zviz": 'profile = "ci-runner"\nallowed_annotation_profiles = ["ci-runner", "hostile-tenant"]\n',
    "zviz-hostile": 'profile = "hostile-tenant"\nallowed_annotation_profiles = []\n',
}
PROFILE_ANNOTATION = "io.zviz.profile"
HOST_ROOT = {"ci-runner": "100000", "hostile-tenant": "200000"}


@pytest.fixture(scope="module")
def cri(tmp_path_factory):
    configs = tmp_path_factory.mktemp("shim-configs")
    handlers = {}
    for handler, text in HANDLER_CONFIGS.items():
        path = configs / f"{handler}.toml"
        path.write_text(text)
        handlers[handler] = str(path)
    with cri_node(
        tmp_path_factory, cri_handlers=handlers, cri_pod_annotations=("io.zviz.*",)
    ) as harness:
        yield harness


async def _host_root(the_pod) -> str:
    """The host id the pod's container root is mapped to (uid_map's second column)."""
    container = await the_pod.start_container("app", "exec sleep 300")
    code, out, err = await the_pod.exec(container, "cat /proc/self/uid_map")
    assert code == 0, err
    return out.split()[1]


def test_two_handlers_side_by_side_run_each_its_operators_profile(cri, tmp_path):
    async def scenario():
        async with contextlib.AsyncExitStack() as pods:
            ci = await pods.enter_async_context(pod(cri, "zviz", tmp_path / "ci"))
            hostile = await pods.enter_async_context(pod(cri, "zviz-hostile", tmp_path / "hostile"))
            # Both pods alive at once on the one node, each under its handler's config.
            return await _host_root(ci), await _host_root(hostile)

    ci_root, hostile_root = run(scenario())
    assert ci_root == HOST_ROOT["ci-runner"]
    assert hostile_root == HOST_ROOT["hostile-tenant"]


def test_an_annotation_the_operator_allows_chooses_the_pods_profile(cri, tmp_path):
    async def scenario():
        annotations = {PROFILE_ANNOTATION: "hostile-tenant"}
        async with pod(cri, "zviz", tmp_path, annotations=annotations) as the_pod:
            return await _host_root(the_pod)

    assert run(scenario()) == HOST_ROOT["hostile-tenant"]


@pytest.mark.parametrize(
    ("handler", "asked", "allowed"),
    [("zviz", "development", "ci-runner, hostile-tenant"), ("zviz-hostile", "ci-runner", "none")],
)
def test_a_profile_outside_the_allowed_list_fails_the_pod_naming_profile_and_rule(
    cri, tmp_path, handler, asked, allowed
):
    async def scenario():
        annotations = {PROFILE_ANNOTATION: asked}
        async with pod(cri, handler, tmp_path, annotations=annotations) as the_pod:
            return await _host_root(the_pod)  # must not get here

    with pytest.raises(GRPCError) as refused:
        run(scenario())
    # The text the kubelet shows in the pod's events.
    message = refused.value.message
    assert f"profile '{asked}' from annotation {PROFILE_ANNOTATION} refused" in message, message
    assert f"not in the operator's allowed_annotation_profiles ({allowed})" in message, message
