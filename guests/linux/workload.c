/*
 * The Linux guest's workload: proof, printed once a second, that memory, time and disk
 * survived whatever the VMM did to the guest (suspend, restore, checkpoint, migration).
 *
 *   tick SEQ pass P sum C up MONO_MS wall REAL_MS [disk D] [net N] [vsock V]
 *
 * - It rewrites a buffer over and over (pass P writes pattern(P, i) into word i, after
 *   checking that word i still holds pattern(P - 1, i)); a wrong word prints
 *   "CORRUPT pass P word I" and exits. C chains every pass: C(P) = mix(C(P - 1) ^ P),
 *   which a test recomputes.
 * - SEQ counts the lines: a gap or repeat means lost or replayed guest time.
 * - MONO_MS (CLOCK_MONOTONIC) must never go backwards; REAL_MS (CLOCK_REALTIME) should
 *   stay within a second of the host's clock.
 * - With `disk=PATH blocks=N` (a virtio disk), each tick writes record SEQ % N, a
 *   512-byte block holding (magic, SEQ, index, 61 words derived from both) and fsyncs.
 *
 * - With `net=IFACE` (a virtio NIC), each tick sends frame SEQ (ethertype 0x88b5) on a
 *   raw packet socket and waits up to 500 ms for it to come back (the host's loop backend
 *   or an echo); N counts the frames that did.
 * It runs as SCHED_IDLE: a background job that never keeps the console's shell waiting
 * (as SCHED_OTHER it shared the one vCPU with the shell, and a typed command's echo came
 * 0.03-0.5 s per character, under pyhyve and QEMU alike).
 * - With `hvc=PATH` (a virtio console), each line also goes there.
 * - With `vsock=PORT` (a virtio vsock), each tick connects to the host (CID 2) on PORT,
 *   sends "vsock SEQ\n" and waits up to 500 ms for the same line back; V counts the
 *   rounds that came back (a new connection each time: after a restore or migration the
 *   device resets every connection, and the next tick's must work).
 * No libc: raw system calls, so the initramfs needs only this and busybox.
 * Arguments: [kib=N] [disk=PATH blocks=N] [net=IFACE] [hvc=PATH] [vsock=PORT].
 */
typedef unsigned long u64;
typedef long s64;

#define SYS_write 1
#define SYS_open 2
#define SYS_pwrite64 18
#define SYS_fsync 74
#define SYS_clock_gettime 228
#define SYS_exit_group 231
#define SYS_ioctl 16
#define SYS_socket 41
#define SYS_sendto 44
#define SYS_recvfrom 45
#define SYS_bind 49
#define SYS_setsockopt 54
#define SYS_close 3
#define SYS_read 0
#define SYS_connect 42
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define O_WRONLY 1
#define O_NOCTTY 0400
#define SYS_sched_setscheduler 144
#define SCHED_IDLE 5
#define AF_PACKET 17
#define SOCK_RAW 3
#define ETH_TYPE 0x88b5 /* IEEE local experimental */
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCGIFINDEX 0x8933
#define IFF_UP 1
#define SOL_SOCKET 1
#define SO_RCVTIMEO 20
#define PACKET_OUTGOING 4
#define NET_MAGIC 0x4c494e55584e4554UL /* "LINUXNET" */
#define O_RDWR 2
#define CLOCK_REALTIME 0
#define CLOCK_MONOTONIC 1
#define MAX_KIB 65536
#define REC_MAGIC 0x4c494e5552454331UL /* "LINUREC1" */

static u64 buf[MAX_KIB * 1024 / 8];

static s64 sys3(s64 n, s64 a, s64 b, s64 c)
{
	s64 r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

static s64 sys4(s64 n, s64 a, s64 b, s64 c, s64 d)
{
	s64 r;
	register s64 r10 __asm__("r10") = d;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return r;
}

static u64 mix(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

static u64 pattern(u64 pass, u64 i)
{
	return (pass * 0x9e3779b97f4a7c15UL) ^ (i * 0xd1b54a32d192ed03UL);
}

static u64 now_ms(int clock)
{
	s64 ts[2];
	sys3(SYS_clock_gettime, clock, (s64)ts, 0);
	return (u64)ts[0] * 1000 + (u64)ts[1] / 1000000;
}

static char line[160];
static int len;
static int hvc = -1;

static void put(const char *s)
{
	while (*s)
		line[len++] = *s++;
}

static void num(u64 v, int base)
{
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (n)
		line[len++] = tmp[--n];
}

static void flush(void)
{
	sys3(SYS_write, 1, (s64)line, len);
	if (hvc >= 0)
		sys3(SYS_write, hvc, (s64)line, len);
	len = 0;
}

static u64 atou(const char *s)
{
	u64 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	return v;
}

static int prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static s64 sys6(s64 n, s64 a, s64 b, s64 c, s64 d, s64 e, s64 f)
{
	s64 r;
	register s64 r10 __asm__("r10") = d;
	register s64 r8 __asm__("r8") = e;
	register s64 r9 __asm__("r9") = f;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10),
			 "r"(r8), "r"(r9) : "rcx", "r11", "memory");
	return r;
}

struct sockaddr_ll { /* <linux/if_packet.h> */
	unsigned short family, protocol;
	int ifindex;
	unsigned short hatype;
	unsigned char pkttype, halen, addr[8];
};

/* A raw packet socket on IFACE, brought up; -1 when there is none. */
static int net_open(const char *iface)
{
	struct {
		char name[16];
		union { int index; short flags; } u;
		char pad[20];
	} ifr = {0};
	struct sockaddr_ll sll = {0};
	s64 tv[2] = {0, 500000}; /* 500 ms receive timeout */
	int fd = (int)sys3(SYS_socket, AF_PACKET, SOCK_RAW,
			   (s64)(((ETH_TYPE & 0xff) << 8) | (ETH_TYPE >> 8)));
	if (fd < 0)
		return -1;
	for (int i = 0; iface[i] && i < 15; i++)
		ifr.name[i] = iface[i];
	if (sys3(SYS_ioctl, fd, SIOCGIFFLAGS, (s64)&ifr) < 0)
		return -1;
	ifr.u.flags |= IFF_UP;
	if (sys3(SYS_ioctl, fd, SIOCSIFFLAGS, (s64)&ifr) < 0 ||
	    sys3(SYS_ioctl, fd, SIOCGIFINDEX, (s64)&ifr) < 0)
		return -1;
	sll.family = AF_PACKET;
	sll.protocol = (unsigned short)(((ETH_TYPE & 0xff) << 8) | (ETH_TYPE >> 8));
	sll.ifindex = ifr.u.index;
	if (sys3(SYS_bind, fd, (s64)&sll, sizeof(sll)) < 0)
		return -1;
	sys6(SYS_setsockopt, fd, SOL_SOCKET, SO_RCVTIMEO, (s64)tv, sizeof(tv), 0);
	return fd;
}

/* Send frame SEQ and wait for it to come back (the host's loop backend or an echo):
 * 1 when it did. Frames from earlier ticks that arrive late are skipped. */
static int net_round(int fd, u64 seq)
{
	unsigned char frame[64] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
				   0x02, 0x00, 0x00, 0x00, 0x00, 0x01,
				   ETH_TYPE >> 8, ETH_TYPE & 0xff};
	u64 *body = (u64 *)(frame + 16), got[8];
	body[0] = NET_MAGIC;
	body[1] = seq;
	body[2] = mix(seq);
	sys6(SYS_sendto, fd, (s64)frame, sizeof(frame), 0, 0, 0);
	for (int tries = 0; tries < 8; tries++) {
		struct sockaddr_ll from = {0};
		unsigned int fromlen = sizeof(from);
		unsigned char in[64];
		s64 n = sys6(SYS_recvfrom, fd, (s64)in, sizeof(in), 0, (s64)&from, (s64)&fromlen);
		if (n < 0)
			return 0; /* timed out */
		if (from.pkttype == PACKET_OUTGOING || n < 40)
			continue; /* our own frame, seen on its way out */
		for (int w = 0; w < 3; w++)
			got[w] = ((u64 *)(in + 16))[w];
		if (got[0] == NET_MAGIC && got[1] == seq && got[2] == mix(seq))
			return 1;
	}
	return 0;
}

/* One round over vsock to the host's PORT: 1 when "vsock SEQ\n" came back whole. */
static int vsock_round(u64 port, u64 seq)
{
	struct { /* <linux/vm_sockets.h> sockaddr_vm */
		unsigned short family, reserved;
		unsigned int port, cid;
		unsigned char flags, zero[3];
	} addr = {AF_VSOCK, 0, (unsigned int)port, 2, 0, {0}};
	s64 tv[2] = {0, 500000};
	char out[32], in[32];
	int n = 0, got = 0, ok = 0;
	int fd = (int)sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		return 0;
	sys6(SYS_setsockopt, fd, SOL_SOCKET, SO_RCVTIMEO, (s64)tv, sizeof(tv), 0);
	const char *p = "vsock ";
	while (*p)
		out[n++] = *p++;
	char d[21];
	int k = 0;
	do { d[k++] = (char)('0' + seq % 10); seq /= 10; } while (seq);
	while (k)
		out[n++] = d[--k];
	out[n++] = '\n';
	if (sys3(SYS_connect, fd, (s64)&addr, sizeof(addr)) == 0 &&
	    sys3(SYS_write, fd, (s64)out, n) == n) {
		while (got < n) {
			s64 r = sys3(SYS_read, fd, (s64)(in + got), n - got);
			if (r <= 0)
				break;
			got += (int)r;
		}
		ok = got == n;
		for (int i = 0; ok && i < n; i++)
			ok = in[i] == out[i];
	}
	sys3(SYS_close, fd, 0, 0);
	return ok;
}

static void record(int fd, u64 seq, u64 blocks)
{
	u64 rec[64], index = seq % blocks;
	rec[0] = REC_MAGIC;
	rec[1] = seq;
	rec[2] = index;
	for (int w = 3; w < 64; w++)
		rec[w] = mix(seq * 64 + (u64)w);
	sys4(SYS_pwrite64, fd, (s64)rec, sizeof(rec), (s64)(index * sizeof(rec)));
	sys3(SYS_fsync, fd, 0, 0);
}

int main(int argc, char **argv)
{
	u64 kib = 4096, blocks = 0, words, pass, sum = 0, seq = 0, next, echoed = 0;
	u64 vport = 0, vrounds = 0;
	const char *disk = 0, *iface = 0;
	int fd = -1, net = -1;

	for (int a = 1; a < argc; a++) {
		if (prefix(argv[a], "kib="))
			kib = atou(argv[a] + 4);
		else if (prefix(argv[a], "disk="))
			disk = argv[a] + 5;
		else if (prefix(argv[a], "blocks="))
			blocks = atou(argv[a] + 7);
		else if (prefix(argv[a], "net="))
			iface = argv[a] + 4;
		else if (prefix(argv[a], "hvc="))
			hvc = (int)sys3(SYS_open, (s64)(argv[a] + 4), O_WRONLY | O_NOCTTY, 0);
		else if (prefix(argv[a], "vsock="))
			vport = atou(argv[a] + 6);
	}
	if (kib < 4 || kib > MAX_KIB)
		kib = 4096;
	int prio = 0;
	sys3(SYS_sched_setscheduler, 0, SCHED_IDLE, (s64)&prio);
	words = kib * 1024 / 8;
	if (disk && blocks) {
		fd = (int)sys3(SYS_open, (s64)disk, O_RDWR, 0);
		if (fd < 0) {
			put("workload: cannot open disk\n");
			flush();
		}
	}
	if (iface) {
		net = net_open(iface);
		if (net < 0) {
			put("workload: cannot open the network interface\n");
			flush();
		}
	}
	next = now_ms(CLOCK_MONOTONIC);
	for (pass = 1;; pass++) {
		for (u64 i = 0; i < words; i++) {
			if (pass > 1 && buf[i] != pattern(pass - 1, i)) {
				put("CORRUPT pass ");
				num(pass, 10);
				put(" word ");
				num(i, 10);
				put("\n");
				flush();
				sys3(SYS_exit_group, 1, 0, 0);
			}
			buf[i] = pattern(pass, i);
		}
		sum = mix(sum ^ pass);
		u64 mono = now_ms(CLOCK_MONOTONIC);
		if (mono < next)
			continue;
		next = mono + 1000;
		seq++;
		if (fd >= 0)
			record(fd, seq, blocks);
		if (net >= 0)
			echoed += (u64)net_round(net, seq);
		if (vport)
			vrounds += (u64)vsock_round(vport, seq);
		put("tick ");
		num(seq, 10);
		put(" pass ");
		num(pass, 10);
		put(" sum ");
		num(sum, 16);
		put(" up ");
		num(mono, 10);
		put(" wall ");
		num(now_ms(CLOCK_REALTIME), 10);
		if (fd >= 0) {
			put(" disk ");
			num(seq % blocks, 10);
		}
		if (net >= 0) {
			put(" net ");
			num(echoed, 10);
		}
		if (vport) {
			put(" vsock ");
			num(vrounds, 10);
		}
		put("\n");
		flush();
	}
}

__asm__(".globl _start\n"
	"_start:\n"
	"	movq (%rsp), %rdi\n"
	"	leaq 8(%rsp), %rsi\n"
	"	andq $-16, %rsp\n"
	"	call main\n"
	"	movl %eax, %edi\n"
	"	movl $231, %eax\n"
	"	syscall\n");
