# usage: a_launch.py IMG QMPSOCK [blockdev] : QEMU 7.2 microvm, paused (-S), no network namespace access, sandboxed,
# data volume passed as an fd set exactly like vroom does.
import os, sys
img, qmp = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "drive"
fd = os.open(img, os.O_RDWR); os.dup2(fd, 3); os.set_inheritable(3, True)
fd = os.open(img, os.O_RDONLY); os.dup2(fd, 4); os.set_inheritable(4, True)
args = ["qemu-system-x86_64", "-M", "microvm", "-S", "-nodefaults", "-display", "none", "-m", "64",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-add-fd", "fd=3,set=3", "-add-fd", "fd=4,set=3",
        "-qmp", f"unix:{qmp},server=on,wait=off", "-qmp", f"unix:{qmp.replace('a.sock', 'aio.sock')},server=on,wait=off"]
if mode == "drive":
    args += ["-drive", "id=vol0,file=/dev/fdset/3,format=raw,if=none,cache=writeback,file.locking=off,discard=unmap",
             "-device", "virtio-blk-device,drive=vol0,serial=vroom-vol-0,share-rw=on"]
else:
    args += ["-blockdev", "driver=file,node-name=vol0-file,filename=/dev/fdset/3,cache.direct=off,cache.no-flush=off,locking=off,discard=unmap",
             "-blockdev", "driver=raw,node-name=vol0-fmt,file=vol0-file,discard=unmap",
             "-device", "virtio-blk-device,drive=vol0-fmt,id=vol0,serial=vroom-vol-0,write-cache=on"]
os.execvp("unshare", ["unshare", "-n", "--"] + args)
