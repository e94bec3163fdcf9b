"""secure_join must resolve every existing component, even after a missing one.

"/missing/../link/x" climbs back out of a component that does not exist and then
walks through `link`, an image symlink. Returning "link/x" unresolved leaves the
symlink for the kernel to follow from the host's root: the mount point (and the
directories `_make_mountpoint` creates) would land on the host.
"""

import os

import pytest

from runtime.rootfs import secure_join


@pytest.fixture
def image(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink("/", root / "abs-to-root")
    os.symlink("../../../../../../../../" + str(outside).lstrip("/"), root / "rel-out")
    os.symlink(str(outside), root / "abs-out")
    return str(root), str(outside)


@pytest.mark.parametrize(
    ("unsafe", "inside"),
    [
        ("/missing/../abs-to-root/x", lambda outside: "x"),
        ("/missing/../rel-out/x", lambda outside: os.path.join(outside.lstrip("/"), "x")),
        ("/missing/more/../../abs-out/x", lambda outside: os.path.join(outside.lstrip("/"), "x")),
        ("/missing/../etc/x", lambda outside: "etc/x"),
    ],
    ids=["absolute-link-to-root", "relative-link-out", "absolute-link-out", "no-link"],
)
def test_components_after_a_missing_one_are_resolved_inside_the_root(image, unsafe, inside):
    root, outside = image
    result = secure_join(root, unsafe)
    assert result == os.path.join(root, inside(outside))
    # Nothing on the returned path is a symlink: the kernel would follow it from
    # the host's root.
    walked = root
    for part in os.path.relpath(result, root).split("/"):
        walked = os.path.join(walked, part)
        assert not os.path.islink(walked), f"{unsafe} -> {result}: {walked} is a symlink"


def test_plain_paths_unchanged(image):
    root, _ = image
    assert secure_join(root, "/etc/new/deeper") == os.path.join(root, "etc/new/deeper")
    assert secure_join(root, "/../../etc") == os.path.join(root, "etc")
    assert secure_join(root, "/abs-to-root/etc") == os.path.join(root, "etc")
