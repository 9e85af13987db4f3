# usage: qsd_launch.py ADDR PORT IMG QMPSOCK [extra qsd args...]
# binds the NBD listening socket itself and hands it to qemu-storage-daemon as fd 3
import os, socket, sys
addr, port, img, qmp = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind((addr, port)); l.listen(8)
os.dup2(l.fileno(), 3); os.set_inheritable(3, True)
extra = sys.argv[5:]
args = ["qemu-storage-daemon",
  *extra, "--blockdev", f"driver=file,node-name=bfile,filename={img},cache.direct=off,locking=off",
  "--blockdev", "driver=raw,node-name=bvol,file=bfile",
  "--nbd-server", "addr.type=fd,addr.str=3" + os.environ.get("NBD_EXTRA", ""),
  "--export", "type=nbd,id=exp0,node-name=bvol,name=vol0,writable=on,writethrough=on",
  "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m"] 
os.execvp(args[0], args)
