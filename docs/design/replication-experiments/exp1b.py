from common import *
q = QMP(D + "/a.sock")
q.hmp('qemu-io vol0 "write -P 0x11 8192 4k"'); time.sleep(1)
q.hmp('qemu-io vol0 "flush"'); time.sleep(1)
q.hmp('qemu-io vol0 "write -f -P 0x12 16384 4k"'); time.sleep(1)
