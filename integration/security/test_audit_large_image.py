"""One large image must not stall the runtime (issue 10, item 10).

Every top-level entry of the image needs a Landlock rule of its own (a rule on "/"
would reach /dev). 20,000 top-level files made a run take 1 s instead of 0.03 s,
all of it inside PID 1's setup, while the shim that spawned it served no other
container. An image with more top-level entries than zviz bounds is refused at once.
"""

import os
import time

from integration.security.test_audit_landlock import base, run_in_image  # noqa: F401


def _add_top_level_files(count):
    def change(rootfs):
        for i in range(count):
            open(os.path.join(rootfs, f"top-file-{i}"), "w").close()

    return change


def test_an_image_with_20000_top_level_files_is_refused_quickly(zviz_bin, base):  # noqa: F811
    started = time.monotonic()
    result = run_in_image(zviz_bin, base, "ci-runner", "echo STARTED", _add_top_level_files(20000))
    elapsed = time.monotonic() - started
    assert "STARTED" not in result.stdout, result.stdout
    assert result.returncode != 0
    assert "entries in / (each needs a rule of its own)" in result.stderr, result.stderr
    print(f"refused in {elapsed:.3f} s")


def test_top_level_files_below_the_bound_stay_readable_and_dev_stays_closed(zviz_bin, base):  # noqa: F811
    script = (
        "cat /top-file-7 && ls / | grep -c top-file; "
        "echo x > /dev/planted 2>/dev/null && echo PLANTED; echo DONE"
    )

    def change(rootfs):
        _add_top_level_files(500)(rootfs)
        with open(os.path.join(rootfs, "top-file-7"), "w") as f:
            f.write("seven\n")

    result = run_in_image(zviz_bin, base, "ci-runner", script, change)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["seven", "500", "DONE"], result.stdout
