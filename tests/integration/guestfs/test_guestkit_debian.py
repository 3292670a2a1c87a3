"""keel-fish inspect on the guest kit's Debian 12 image (guest/build.sh debian) equals virt-inspector's
output, and names Debian 12, the kit's hostname and its package list. The image takes minutes to
build, so ctest makes it once through the guest_debian fixture (KEEL_GUEST_DEBIAN overrides the path)."""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fishtest import *  # noqa: E402,F401,F403

repo = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
image = os.environ.get("KEEL_GUEST_DEBIAN", os.path.join(repo, "guest/out/debian.qcow2"))
if not os.path.exists(image):
    print(f"FAIL: no guest kit Debian image at {image} (build it with guest/build.sh debian)")
    sys.exit(1)
work = tmpdir()
copy = os.path.join(work, "debian.qcow2")
shutil.copy(image, copy)  # never hold a lock on the kit's own image
env = dict(os.environ, LIBGUESTFS_BACKEND="direct", LIBGUESTFS_BACKEND_SETTINGS="force_tcg")
ours = fish("inspect", "-a", copy).stdout.decode()
check("<distro>debian</distro>" in ours and "<major_version>12</major_version>" in ours, "inspect: Debian 12")
check("<hostname>keel-debian</hostname>" in ours, "inspect: the kit's hostname")
check(ours.count("<application>") > 50, f"inspect: {ours.count('<application>')} packages")
theirs = run(["virt-inspector", "-a", copy], env=env).stdout.decode()
check(ours == theirs, "keel-fish inspect equals virt-inspector on the kit's image")
if ours != theirs:
    import difflib
    for line in list(difflib.unified_diff(theirs.splitlines(), ours.splitlines(), lineterm=""))[:30]:
        print("    " + line)
rmtree(work)
finish()
