/*
 * virtio device guest: finds virtio devices on PCI bus 0 through 0xCF8/0xCFC, drives them
 * from ring 3 (BAR and rings on user pages; it polls the used rings, except that
 * `bench=blk irq` waits for the disk's MSI-X interrupts), and reports on COM1.
 *
 * Each round r: on disk0 it writes `blocks` numbered 4 KiB blocks (header: magic, round,
 * index; then data derived from all three), reads every one back and checks it; it reads
 * 64 bytes from rng0; it writes "vcon <round>" to vconsole0's port, and echoes what the
 * port sent it as "echo:<bytes>"; on net0 (loop mode) it sends `frames` numbered frames
 * and checks each comes back in order ("net <round> <frames>"); over vsock0 it connects to
 * the host's port 5000, sends "ping <round>", expects "pong <round>" and closes
 * ("vsock <round> ok"), answers host connections to its port 6000 by echoing ("echo:"), and
 * on a transport reset (restore, migration) prints "vsock reset" and connects again. It prints
 * "V<round> <blocks> <rng bytes>" per round, and
 * "VIRTIO ERROR ..." with what went wrong (a device error, a wrong block, a timeout).
 * Rounds continue from the disk's own content after a restore or migration: the round
 * number lives in guest memory and is written into every block, so a lost or repeated
 * write is caught when the block is read back.
 *
 * cmdline: blocks=N (default 64)  rounds=N (0: forever, default)  frames=N (default 16)
 *          ecam: reach configuration space through ECAM at 0xF0000000 instead of 0xCF8
 *          evidx: negotiate VIRTIO_RING_F_EVENT_IDX (and notify only as avail_event asks)
 *          indirect: negotiate VIRTIO_RING_F_INDIRECT_DESC; disk requests use an indirect table
 */
#include "rt.h"

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

#define VENDOR 0x1AF4
#define MAGIC 0x4B4C425659485950ULL /* "PYHYVBLK" */
#define QSIZE 256  /* the most a queue holds here; each takes min(qlimit, the device's) */
/* 16 unless benchmarking: a device that restored its ring positions wrongly then sees the
 * available index run ahead by more than the queue size, an error, instead of replaying
 * old entries quietly */
static uint16_t qlimit = 16;
#define BLOCK 4096

static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
#define barrier() __asm__ volatile("" ::: "memory")

#define ECAM 0xF0000000UL
static int use_ecam, use_evidx, use_indirect, use_irq;

static uint32_t cfg32(int dev, int reg)
{
	if (use_ecam)
		return *(volatile uint32_t *)(ECAM + ((uint64_t)dev << 15) + (uint64_t)(reg & 0xFFC));
	outl(0xCF8, 0x80000000u | (uint32_t)dev << 11 | (uint32_t)(reg & 0xFC));
	return inl(0xCFC);
}

static void cfg_write32(int dev, int reg, uint32_t v)
{
	if (use_ecam) {
		*(volatile uint32_t *)(ECAM + ((uint64_t)dev << 15) + (uint64_t)(reg & 0xFFC)) = v;
		return;
	}
	outl(0xCF8, 0x80000000u | (uint32_t)dev << 11 | (uint32_t)(reg & 0xFC));
	outl(0xCFC, v);
}

static uint8_t cfg8(int dev, int reg) { return (uint8_t)(cfg32(dev, reg) >> (8 * (reg & 3))); }

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vq {
	struct desc desc[QSIZE];
	uint16_t avail_flags, avail_idx, avail_ring[QSIZE + 1];  /* + used_event */
	uint8_t pad[(4096 - (16 * QSIZE + 6 + 2 * QSIZE) % 4096) % 4096];
	uint16_t used_flags, used_idx;
	struct { uint32_t id, len; } used_ring[QSIZE];
	uint16_t avail_event_room;  /* avail_event sits right after the queue's own size */
} __attribute__((aligned(4096)));

struct dev {
	int slot, type, nq;
	volatile uint8_t *common, *device, *notify[3];
	struct vq *q[3];
	uint16_t last_used[3], qs[3];  /* qs: each queue's size */
};

#define MAXDEV 5
static struct vq queues[3 * MAXDEV];
static struct dev devs[MAXDEV];
static uint8_t blockbuf[BLOCK] __attribute__((aligned(4096)));
static uint8_t rngbuf[64];
static struct { uint32_t type, reserved; uint64_t sector; } req;
static volatile uint8_t status;

static void fail(const char *what, uint64_t a, uint64_t b)
{
	puts_("VIRTIO ERROR ");
	puts_(what);
	putc_(' ');
	putu(a);
	putc_(' ');
	putu(b);
	putc_('\n');
	poweroff();
}

#define C8(d, o) (*(volatile uint8_t *)((d)->common + (o)))
#define C16(d, o) (*(volatile uint16_t *)((d)->common + (o)))
#define C32(d, o) (*(volatile uint32_t *)((d)->common + (o)))
#define C64(d, o) (*(volatile uint64_t *)((d)->common + (o)))

/* Where BAR i of a function is (0 for an I/O BAR); a 64-bit BAR takes i + 1 too. The
 * identity map covers 4 GiB: a BAR above it cannot be reached. */
static uint64_t bar_addr(int slot, int i)
{
	uint32_t lo = cfg32(slot, 0x10 + 4 * i);
	if (i > 5 || lo & 1)
		return 0;
	uint64_t a = lo & ~0xFULL;
	if ((lo & 6) == 4)
		a |= (uint64_t)cfg32(slot, 0x14 + 4 * i) << 32;
	if (a >> 32)
		fail("BAR above 4 GiB on slot", (uint64_t)slot, a);
	return a;
}

/* `irq`: MSI-X table entry 0 to this CPU's xAPIC, vector KIT_IRQ_VECTOR, unmasked, and
 * MSI-X enabled (before the queues get vectors: a device without it enabled refuses them).
 * Returns 0 when the function has no MSI-X capability. */
static int msix_setup(int slot)
{
	for (int p = cfg8(slot, 0x34); p; p = cfg8(slot, p + 1)) {
		if (cfg8(slot, p) != 0x11)
			continue;
		uint32_t where = cfg32(slot, p + 4);
		volatile uint32_t *e = (volatile uint32_t *)(bar_addr(slot, (int)(where & 7))
							     + (where & ~7u));
		e[0] = 0xFEE00000u;  /* destination: APIC ID 0, physical */
		e[1] = 0;
		e[2] = KIT_IRQ_VECTOR;  /* fixed delivery, edge */
		e[3] = 0;  /* unmasked */
		cfg_write32(slot, p, (cfg32(slot, p) | 1u << 31) & ~(1u << 30));  /* enable */
		return 1;
	}
	return 0;
}

/* Let the xAPIC deliver the device's MSI-X and nothing else: the 8259s masked (firmware
 * may have left the PIT's IRQ 0 open), the LAPIC's own sources masked, the LAPIC on. A
 * device that never interrupts leaves the guest asleep: the host's timeout catches it. */
static void irq_enable(void)
{
	outb(0x21, 0xFF);
	outb(0xA1, 0xFF);
	volatile uint32_t *apic = (volatile uint32_t *)0xFEE00000UL;
	apic[0x320 / 4] = 1u << 16;  /* timer, LINT0, LINT1, error: masked */
	apic[0x350 / 4] = 1u << 16;
	apic[0x360 / 4] = 1u << 16;
	apic[0x370 / 4] = 1u << 16;
	apic[0x80 / 4] = 0;  /* task priority: take every vector */
	apic[0xF0 / 4] = 0x100 | 0xFF;  /* software enable, spurious vector 0xFF */
}

static int probe(struct dev *d, int slot, struct vq *q)  /* q: room for three queues */
{
	uint32_t id = cfg32(slot, 0);
	if ((id & 0xFFFF) != VENDOR || (id >> 16) < 0x1040)
		return 0;
	d->slot = slot;
	d->type = (int)(id >> 16) - 0x1040;
	cfg_write32(slot, 4, cfg32(slot, 4) | 6);  /* memory space, bus master */
	uint32_t notify_mult = 0;
	uint64_t notify_base = 0;
	for (int p = cfg8(slot, 0x34); p; p = cfg8(slot, p + 1)) {
		if (cfg8(slot, p) != 0x09)
			continue;
		uint64_t at = bar_addr(slot, cfg8(slot, p + 4)) + cfg32(slot, p + 8);
		switch (cfg8(slot, p + 3)) {
		case 1: d->common = (volatile uint8_t *)at; break;
		case 2: notify_base = at; notify_mult = cfg32(slot, p + 16); break;
		case 4: d->device = (volatile uint8_t *)at; break;
		}
	}
	if (!d->common || !notify_mult)
		fail("capabilities missing on slot", (uint64_t)slot, 0);
	int irq = use_irq && d->type == 2 && msix_setup(slot);
	C8(d, 0x14) = 0;                         /* reset */
	C8(d, 0x14) = 1 | 2;                     /* ACKNOWLEDGE | DRIVER */
	C32(d, 0x08) = 1;
	C32(d, 0x0C) = 1;                        /* VIRTIO_F_VERSION_1 */
	C32(d, 0x08) = 0;
	C32(d, 0x0C) = (use_evidx ? 1u << 29 : 0) | (use_indirect ? 1u << 28 : 0);
	C8(d, 0x14) = 1 | 2 | 8;                 /* FEATURES_OK */
	if (!(C8(d, 0x14) & 8))
		fail("features refused on slot", (uint64_t)slot, 0);
	d->nq = d->type == 19 ? 3 : d->type == 3 || d->type == 1 ? 2 : 1;
	for (int i = 0; i < d->nq; i++) {
		C16(d, 0x16) = (uint16_t)i;
		d->qs[i] = C16(d, 0x18) < qlimit ? C16(d, 0x18) : qlimit;
		C16(d, 0x18) = d->qs[i];
		C16(d, 0x1A) = irq && i == 0 ? 0 : 0xFFFF;  /* MSI-X vector 0, or we poll */
		if (C16(d, 0x1A) != (irq && i == 0 ? 0 : 0xFFFF))
			fail("queue MSI-X vector refused on slot", (uint64_t)slot, (uint64_t)i);
		C64(d, 0x20) = (uint64_t)q[i].desc;
		C64(d, 0x28) = (uint64_t)&q[i].avail_flags;
		C64(d, 0x30) = (uint64_t)&q[i].used_flags;
		d->notify[i] = (volatile uint8_t *)(notify_base + C16(d, 0x1E) * notify_mult);
		C16(d, 0x1C) = 1;                /* queue enable */
		d->q[i] = &q[i];
		d->last_used[i] = q[i].used_idx;
	}
	C8(d, 0x14) = 1 | 2 | 8 | 4;             /* DRIVER_OK */
	return 1;
}

/* Notify the device of queue qi, unless EVENT_IDX says it does not want to know yet. */
static void notify(struct dev *d, int qi, uint16_t old)
{
	struct vq *q = d->q[qi];
	__asm__ volatile("mfence" ::: "memory");
	uint16_t event = *(volatile uint16_t *)((volatile uint8_t *)&q->used_flags + 4 + 8 * d->qs[qi]);
	uint16_t now = q->avail_idx;
	if (use_evidx && (uint16_t)(now - event - 1) >= (uint16_t)(now - old))
		return;
	*(volatile uint16_t *)d->notify[qi] = (uint16_t)qi;
}

/* Offer descriptors 0..n-1 of queue qi as one chain. */
static void post(struct dev *d, int qi, int n)
{
	struct vq *q = d->q[qi];
	for (int i = 0; i < n - 1; i++) {
		q->desc[i].flags |= 1;
		q->desc[i].next = (uint16_t)(i + 1);
	}
	q->avail_ring[q->avail_idx % d->qs[qi]] = 0;
	barrier();
	uint16_t old = q->avail_idx++;
	barrier();
	notify(d, qi, old);
}

/* Whether the device used the request (its written length in *len). */
static int used(struct dev *d, int qi, uint32_t *len)
{
	struct vq *q = d->q[qi];
	if (*(volatile uint16_t *)&q->used_idx == d->last_used[qi])
		return 0;
	barrier();
	*len = q->used_ring[d->last_used[qi] % d->qs[qi]].len;
	d->last_used[qi]++;
	return 1;
}

/* post(), then wait for the device; returns the length it wrote. */
static uint32_t submit_q(struct dev *d, int qi, int n)
{
	uint32_t len;
	post(d, qi, n);
	uint64_t deadline = rdtsc() + tsc_hz() * 30;  /* generous: a loaded host may starve the VMM for seconds */
	while (!used(d, qi, &len)) {
		if (C8(d, 0x14) & 0x40)
			fail("device needs a reset, type", (uint64_t)d->type, 0);
		if (rdtsc() > deadline)
			fail("request timed out, type", (uint64_t)d->type, d->last_used[qi]);
		cpu_relax();
	}
	return len;
}

static uint32_t submit(struct dev *d, int n) { return submit_q(d, 0, n); }

/* Make chain `head` of queue qi available, without notifying; returns the old index. */
static uint16_t publish(struct dev *d, int qi, uint16_t head)
{
	struct vq *q = d->q[qi];
	q->avail_ring[q->avail_idx % d->qs[qi]] = head;
	barrier();
	return q->avail_idx++;
}

/* The head of the request used() just took from queue qi. */
static uint16_t last_head(struct dev *d, int qi)
{
	return (uint16_t)d->q[qi]->used_ring[(uint16_t)(d->last_used[qi] - 1) % d->qs[qi]].id;
}

/* Offer descriptor `head` of queue qi on its own. */
static void post_head(struct dev *d, int qi, uint16_t head)
{
	d->q[qi]->desc[head].flags &= (uint16_t)~1;
	uint16_t old = publish(d, qi, head);
	barrier();
	notify(d, qi, old);
}

static void setd(struct vq *q, int i, const void *addr, uint32_t len, int write)
{
	q->desc[i].addr = (uint64_t)addr;
	q->desc[i].len = len;
	q->desc[i].flags = write ? 2 : 0;
	q->desc[i].next = 0;
}

static uint64_t word(uint64_t round, uint64_t block, uint64_t k)
{
	uint64_t h = MAGIC ^ round * 0x9E3779B97F4A7C15ULL ^ block << 32 ^ k;
	h ^= h >> 29;
	h *= 0xBF58476D1CE4E5B9ULL;
	return h ^ h >> 32;
}

static void blk_io(struct dev *d, uint32_t type, uint64_t block)
{
	req.type = type;
	req.reserved = 0;
	req.sector = block * (BLOCK / 512);
	status = 0xFF;
	if (use_indirect) {  /* the three buffers in a table of their own, one ring slot */
		static struct desc table[3] __attribute__((aligned(16)));
		table[0] = (struct desc){(uint64_t)&req, sizeof req, 1, 1};
		table[1] = (struct desc){(uint64_t)blockbuf, BLOCK, (uint16_t)(1 | (type == 0 ? 2 : 0)), 2};
		table[2] = (struct desc){(uint64_t)&status, 1, 2, 0};
		d->q[0]->desc[0] = (struct desc){(uint64_t)table, sizeof table, 4, 0};
		submit(d, 1);
	} else {
		setd(d->q[0], 0, &req, sizeof req, 0);
		setd(d->q[0], 1, blockbuf, BLOCK, type == 0);
		setd(d->q[0], 2, (const void *)&status, 1, 1);
		submit(d, 3);
	}
	if (status != 0)
		fail("block request failed, status", status, block);
}

static uint64_t round_no;  /* lives in guest memory: a restored guest goes on from it */
#define RXN 8
#define FRAME 78
static uint8_t rxframes[RXN][2048];
static uint8_t txframe[12 + FRAME];
static uint64_t net_sent, net_got;  /* frames sent and received back, ever */

/* --- vsock ------------------------------------------------------------------------------ */
struct vhdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port, len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
#define VRX 8
static uint8_t vsrx[VRX][4096];
static uint8_t vstx[4096];
static uint32_t vsev;
static uint64_t vs_fwd, echo_fwd, vs_resets;  /* bytes taken, per connection (spec 5.10) */
static uint32_t echo_peer;  /* the host port of a connection to our port 6000 */

static void vs_send(struct dev *v, uint16_t op, uint32_t lport, uint32_t rport,
		    const char *data, uint32_t len, uint32_t flags)
{
	struct vhdr *h = (struct vhdr *)vstx;
	h->src_cid = *(volatile uint64_t *)v->device;
	h->dst_cid = 2;
	h->src_port = lport;
	h->dst_port = rport;
	h->len = len;
	h->type = 1;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = 65536;
	h->fwd_cnt = (uint32_t)(lport == 6000 ? echo_fwd : vs_fwd);
	memcpy(vstx + sizeof *h, data, len);
	setd(v->q[1], 0, vstx, (uint32_t)sizeof *h + len, 0);
	submit_q(v, 1, 1);
}

static void vs_start(struct dev *v)
{
	for (uint16_t i = 0; i < VRX; i++) {
		setd(v->q[0], i, vsrx[i], sizeof vsrx[i], 1);
		post_head(v, 0, i);
	}
	setd(v->q[2], 0, &vsev, sizeof vsev, 1);
	post_head(v, 2, 0);
}

/* Serve the host's side: a transport reset (returns 1), connections to our port 6000
 * (accepted and echoed); anything else for `want_port` is copied to *out (returns 2). */
static int vs_poll(struct dev *v, uint32_t want_port, struct vhdr *out, char *data)
{
	uint32_t len;
	if (used(v, 2, &len)) {
		if (len != 4 || vsev != 0)
			fail("vsock event: length, id", len, vsev);
		vs_resets++;
		puts_("vsock reset\n");
		post_head(v, 2, 0);
		echo_peer = 0;
		return 1;
	}
	if (!used(v, 0, &len))
		return 0;
	uint16_t head = last_head(v, 0);
	if (head >= VRX)
		fail("vsock receive buffer", head, len);
	struct vhdr *h = (struct vhdr *)vsrx[head];
	char *payload = (char *)vsrx[head] + sizeof *h;
	int got = 0;
	if (h->op == 5) {  /* credit: only this connection's bytes (not a stale one's) */
		if (h->dst_port == 6000)
			echo_fwd += h->len;
		else if (h->dst_port == want_port)
			vs_fwd += h->len;
	}
	if (h->dst_port == 6000) {
		if (h->op == 1) {                       /* REQUEST: accept */
			echo_peer = h->src_port;
			echo_fwd = 0;
			vs_send(v, 2, 6000, h->src_port, "", 0, 0);
		} else if (h->op == 5 && h->len <= 64) {  /* RW: echo it */
			char e[70];
			memcpy(e, "echo:", 5);
			memcpy(e + 5, payload, h->len);
			vs_send(v, 5, 6000, h->src_port, e, 5 + h->len, 0);
		}
	} else if (h->dst_port == want_port) {
		*out = *h;
		memcpy(data, payload, h->len > 64 ? 64 : h->len);
		got = 2;
	}
	post_head(v, 0, head);
	return got;
}

/* Wait for a packet to `port`: 0 with it in *h, 1 if a transport reset came first. */
static int vs_wait(struct dev *v, uint32_t port, struct vhdr *h, char *data)
{
	uint64_t deadline = rdtsc() + tsc_hz() * 30;  /* generous: a loaded host may starve the VMM for seconds */
	for (;;) {
		int r = vs_poll(v, port, h, data);
		if (r == 1)
			return 1;
		if (r == 2)
			return 0;
		if (rdtsc() > deadline)
			fail("vsock: nothing came for port", port, 0);
		cpu_relax();
	}
}

/* One connection to the host's port 5000: ping, pong, close. 1: a reset cut it. */
static int vs_round(struct dev *v, uint64_t r)
{
	/* a new local port after each reset: what the old connection left in the ring
	 * (delivered before the reset, read after it) is for another port */
	uint32_t lport = 1024 + (uint32_t)((r * 8 + vs_resets) % 60000);
	struct vhdr h;
	char data[64], msg[32];
	vs_fwd = 0;                                       /* a new connection's count */
	vs_send(v, 1, lport, 5000, "", 0, 0);            /* REQUEST */
	do {
		if (vs_wait(v, lport, &h, data))
			return 1;
	} while (h.op != 2 && h.op != 3);                 /* stale traffic is dropped */
	if (h.op != 2)
		fail("vsock connect refused, op", h.op, r);
	int n = 0;
	const char *p = "ping ";
	while (*p)
		msg[n++] = *p++;
	char d[21];
	int k = 0;
	uint64_t x = r;
	do { d[k++] = (char)('0' + x % 10); x /= 10; } while (x);
	while (k)
		msg[n++] = d[--k];
	vs_send(v, 5, lport, 5000, msg, (uint32_t)n, 0);   /* RW */
	do {
		if (vs_wait(v, lport, &h, data))
			return 1;
	} while (h.op == 6);                              /* credit updates */
	if (h.op != 5 || h.len != (uint32_t)n || data[0] != 'p' || data[1] != 'o')
		fail("vsock reply wrong: op, len", h.op, h.len);
	for (int i = 4; i < n; i++)
		if (data[i] != msg[i])
			fail("vsock reply wrong at byte", (uint64_t)i, r);
	vs_send(v, 4, lport, 5000, "", 0, 3);             /* SHUTDOWN both */
	do {
		if (vs_wait(v, lport, &h, data))
			return 1;
	} while (h.op != 3);                              /* until RST */
	return 0;
}

static void net_start(struct dev *n)
{
	for (uint16_t i = 0; i < RXN; i++) {
		setd(n->q[0], i, rxframes[i], sizeof rxframes[i], 1);
		post_head(n, 0, i);
	}
}

/* One numbered frame out and, looped back, in: in order, intact. */
static void net_frame(struct dev *n, uint64_t r)
{
	volatile uint8_t *mac = n->device;
	uint8_t *f = txframe + 12;
	memset(txframe, 0, sizeof txframe);
	for (int i = 0; i < 6; i++)
		f[i] = f[6 + i] = mac[i];
	f[12] = 0x88;
	f[13] = 0xB5;
	uint64_t *p = (uint64_t *)(f + 14);
	p[0] = r;
	p[1] = net_sent;
	for (int k = 2; k < 8; k++)
		p[k] = word(r, net_sent, (uint64_t)k);
	net_sent++;
	setd(n->q[1], 0, txframe, sizeof txframe, 0);
	submit_q(n, 1, 1);
	uint32_t len;
	uint64_t deadline = rdtsc() + tsc_hz() * 30;  /* generous: a loaded host may starve the VMM for seconds */
	while (!used(n, 0, &len)) {
		if (rdtsc() > deadline)
			fail("net frame never came back, sent", net_sent, net_got);
		cpu_relax();
	}
	uint16_t head = last_head(n, 0);
	if (head >= RXN || len != 12 + FRAME)
		fail("net receive: buffer, length", head, len);
	uint8_t *g = rxframes[head] + 12;
	uint64_t *gp = (uint64_t *)(g + 14);
	if (g[12] != 0x88 || g[13] != 0xB5 || gp[1] != net_got)
		fail("net frame out of order: got, expected", gp[1], net_got);
	for (int k = 2; k < 8; k++)
		if (gp[k] != word(gp[0], gp[1], (uint64_t)k))
			fail("net frame corrupt: seq, word", gp[1], (uint64_t)k);
	net_got++;
	post_head(n, 0, head);
}
static char rxbuf[64], txbuf[96];

static void con_write(struct dev *c, const char *s, int n)
{
	memcpy(txbuf, s, (size_t)n);
	setd(c->q[1], 0, txbuf, (uint32_t)n, 0);
	submit_q(c, 1, 1);
}

static void con_line(struct dev *c, const char *prefix, uint64_t v)
{
	char b[48];
	int n = 0;
	while (*prefix)
		b[n++] = *prefix++;
	char d[21];
	int k = 0;
	do { d[k++] = (char)('0' + v % 10); v /= 10; } while (v);
	while (k)
		b[n++] = d[--k];
	b[n++] = '\n';
	con_write(c, b, n);
}

static void con_rx_post(struct dev *c)
{
	setd(c->q[0], 0, rxbuf, sizeof rxbuf, 1);
	post(c, 0, 1);
}

/* --- bench=blk: the disk's throughput, polled ------------------------------------------
 * qd requests of bs bytes each kept in flight for `ms` milliseconds (TSC), reads or writes
 * (`write`), sequential or at random bs-aligned places (`rand`) within the first `span`
 * bytes. Each request is three descriptors (header, data, status) with its own slot. The
 * used ring is polled, with no interrupts; with `irq`, the queue's MSI-X vector goes to this
 * CPU's xAPIC and the guest sleeps (kit_wait_irq: hlt in kernel mode) until an interrupt
 * comes, then reaps what the ring holds with interrupts suppressed, as Linux's virtio-blk
 * does (the handler and the sleep are kernel-mode code, emulated on the project's hosts
 * for any VMM). "BENCH go" is printed just before the first request and "BENCH end
 * ops=N" after the last completed: the host times the two lines. With `mark=M`, a '.' is
 * printed after every M completions: the host sees when the disk stopped making progress
 * (the pause a checkpoint or a migration adds to a busy disk). */
#define BENCH_BUF 0x4000000UL  /* 64 MiB: data buffers from here, identity mapped */
static struct { uint32_t type, reserved; uint64_t sector; } breq[QSIZE / 3];
static volatile uint8_t bstatus[QSIZE / 3];

static void blk_bench(struct dev *d, const char *cmdline, uint64_t sectors)
{
	uint64_t bs = arg_u64(cmdline, "bs", 4096), qd = arg_u64(cmdline, "qd", 1);
	uint64_t ms = arg_u64(cmdline, "ms", 1000), span = arg_u64(cmdline, "span", 256 << 20);
	uint64_t mark = arg_u64(cmdline, "mark", 0);
	int wr = arg_flag(cmdline, "write"), rnd = arg_flag(cmdline, "rand");
	if (span > sectors * 512)
		span = sectors * 512;
	if (!bs || bs % 4096 || qd < 1 || qd * 3 > d->qs[0] || span < bs
	    || BENCH_BUF + qd * bs > ram_top)
		fail("bench: bad bs or qd (or too little RAM)", bs, qd);
	uint64_t places = span / bs, next = 0, x = 0x9E3779B97F4A7C15ULL, ops = 0, issued = 0;
	uint8_t *buf = (uint8_t *)BENCH_BUF;
	for (uint64_t i = 0; i < qd * bs; i += 8)
		*(uint64_t *)(buf + i) = word(7, i, 3);
	struct vq *q = d->q[0];
	q->avail_flags = 1;  /* VIRTQ_AVAIL_F_NO_INTERRUPT: polled, or reaping (irq, below) */
	uint64_t seen = irq_count;
	if (use_irq)
		irq_enable();
	puts_("BENCH go\n");
	uint64_t end = rdtsc() + tsc_hz() / 1000 * ms;
	for (uint64_t s = 0; s < qd; s++) {  /* slot s: descriptors 3s..3s+2, head 3s */
		uint64_t place = rnd ? (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x % places) : next++ % places;
		breq[s].type = wr ? 1 : 0;
		breq[s].sector = place * (bs / 512);
		bstatus[s] = 0xFF;
		q->desc[3 * s] = (struct desc){(uint64_t)&breq[s], 16, 1, (uint16_t)(3 * s + 1)};
		q->desc[3 * s + 1] = (struct desc){(uint64_t)(buf + s * bs), (uint32_t)bs,
						   (uint16_t)(1 | (wr ? 0 : 2)), (uint16_t)(3 * s + 2)};
		q->desc[3 * s + 2] = (struct desc){(uint64_t)&bstatus[s], 1, 2, 0};
		publish(d, 0, (uint16_t)(3 * s));
		issued++;
	}
	notify(d, 0, (uint16_t)(q->avail_idx - qd));
	uint64_t deadline = rdtsc() + tsc_hz() * 30;
	while (ops < issued) {
		uint32_t len;
		int more = 0;
		if (use_irq) {  /* as Linux's virtio-blk: interrupts back on, one more look at
				 * the ring, and sleep only if it has nothing; off while reaping */
			q->avail_flags = 0;
			__asm__ volatile("mfence" ::: "memory");
			if (*(volatile uint16_t *)&q->used_idx == d->last_used[0])
				while (irq_count == seen)
					kit_wait_irq();
			seen = irq_count;
			q->avail_flags = 1;
		}
		while (used(d, 0, &len)) {
			uint64_t s = last_head(d, 0) / 3u;
			if (bstatus[s] != 0)
				fail("bench: request failed, status", bstatus[s], breq[s].sector);
			ops++;
			if (mark && ops % mark == 0)
				putc_('.');
			deadline = rdtsc() + tsc_hz() * 30;
			if (rdtsc() < end) {
				uint64_t place = rnd ? (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x % places)
						     : next++ % places;
				breq[s].sector = place * (bs / 512);
				bstatus[s] = 0xFF;
				publish(d, 0, (uint16_t)(3 * s));
				issued++;
				more++;
			}
		}
		if (more)
			notify(d, 0, (uint16_t)(q->avail_idx - more));
		if (rdtsc() > deadline) {  /* the status register only then: reading it exits */
			if (C8(d, 0x14) & 0x40)
				fail("bench: device needs a reset", ops, issued);
			fail("bench: request timed out", ops, issued);
		}
		cpu_relax();
	}
	puts_("BENCH end ops=");
	putu(ops);
	puts_(" bytes=");
	putu(ops * bs);
	puts_(" irqs=");
	putu(irq_count);
	putc_('\n');
	poweroff();
}

/* --- bench=netrx: frames in through virtio-net, polled --------------------------------
 * The host floods the device's tap; every frame of EtherType 0x88B5 that arrives for `ms`
 * milliseconds is counted (others, such as the host's own IPv6 chatter, are not) and its
 * buffer offered again at once (the 8 receive buffers of every run plus 64 more, each
 * room for a full frame). "BENCH go" and "BENCH end ops=N bytes=M": N frames, M bytes. */
static uint8_t nbuf[64][12 + 1514];

static void netrx_bench(struct dev *n, const char *cmdline)
{
	uint64_t ms = arg_u64(cmdline, "ms", 1000), rx = 0, bytes = 0;
	struct vq *r = n->q[0];
	if (n->qs[0] < RXN + 64)
		fail("bench: receive queue too small", n->qs[0], RXN + 64);
	r->avail_flags = 1;  /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
	for (uint16_t i = 0; i < 64; i++) {
		setd(r, RXN + i, nbuf[i], sizeof nbuf[i], 1);
		publish(n, 0, RXN + i);
	}
	notify(n, 0, (uint16_t)(r->avail_idx - 64));
	puts_("BENCH go\n");
	uint64_t end = rdtsc() + tsc_hz() / 1000 * ms;
	while (rdtsc() < end) {
		uint32_t len;
		int back = 0;
		while (used(n, 0, &len)) {
			uint16_t h = last_head(n, 0);
			const uint8_t *f = (h < RXN ? rxframes[h] : nbuf[h - RXN]) + 12;
			if (len >= 12 + 14 && f[12] == 0x88 && f[13] == 0xB5) {
				rx++;
				bytes += len - 12;
			}
			publish(n, 0, h);
			back++;
		}
		if (back)
			notify(n, 0, (uint16_t)(r->avail_idx - back));
		cpu_relax();
	}
	puts_("BENCH end ops=");
	putu(rx);
	puts_(" bytes=");
	putu(bytes);
	putc_('\n');
	poweroff();
}

/* --- bench=net: frames out through virtio-net, polled ----------------------------------
 * qd frames of `size` bytes (Ethernet header included, experimental EtherType 0x88B5, to
 * the broadcast address) kept in flight on the transmit queue for `ms` milliseconds; frames
 * that come back (loop mode) are taken and their buffers offered again. "BENCH go" and
 * "BENCH end ops=N bytes=M rx=R": N frames sent, as in bench=blk. */
#define NET_BENCH_QD 64

static void net_bench(struct dev *n, const char *cmdline)
{
	uint64_t qd = arg_u64(cmdline, "qd", 32), ms = arg_u64(cmdline, "ms", 1000);
	uint64_t size = arg_u64(cmdline, "size", 64), ops = 0, issued = 0, rx = 0;
	if (qd < 1 || qd > NET_BENCH_QD || qd > n->qs[1] || size < 60 || size > 1514)
		fail("bench: bad qd or size", qd, size);
	volatile uint8_t *mac = n->device;
	struct vq *t = n->q[1], *r = n->q[0];
	t->avail_flags = r->avail_flags = 1;  /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
	for (uint64_t s = 0; s < qd; s++) {
		uint8_t *f = nbuf[s] + 12;
		memset(nbuf[s], 0, sizeof nbuf[s]);
		for (int i = 0; i < 6; i++) {
			f[i] = 0xFF;
			f[6 + i] = mac[i];
		}
		f[12] = 0x88;
		f[13] = 0xB5;
		t->desc[s] = (struct desc){(uint64_t)nbuf[s], (uint32_t)(12 + size), 0, 0};
	}
	puts_("BENCH go\n");
	uint64_t end = rdtsc() + tsc_hz() / 1000 * ms, deadline = rdtsc() + tsc_hz() * 30;
	for (uint64_t s = 0; s < qd; s++) {
		publish(n, 1, (uint16_t)s);
		issued++;
	}
	notify(n, 1, (uint16_t)(t->avail_idx - qd));
	while (ops < issued) {
		uint32_t len;
		int more = 0, back = 0;
		while (used(n, 1, &len)) {
			uint16_t s = last_head(n, 1);
			ops++;
			deadline = rdtsc() + tsc_hz() * 30;
			if (rdtsc() < end) {
				publish(n, 1, s);
				issued++;
				more++;
			}
		}
		while (used(n, 0, &len)) {  /* a frame came back: offer its buffer again */
			publish(n, 0, last_head(n, 0));
			rx++;
			back++;
		}
		if (more)
			notify(n, 1, (uint16_t)(t->avail_idx - more));
		if (back)
			notify(n, 0, (uint16_t)(r->avail_idx - back));
		if (rdtsc() > deadline)
			fail("bench: frames not sent", ops, issued);
		cpu_relax();
	}
	puts_("BENCH end ops=");
	putu(ops);
	puts_(" bytes=");
	putu(ops * size);
	puts_(" rx=");
	putu(rx);
	putc_('\n');
	poweroff();
}

void main(const char *cmdline)
{
	uint64_t blocks = arg_u64(cmdline, "blocks", 64);
	uint64_t rounds = arg_u64(cmdline, "rounds", 0);
	uint64_t frames = arg_u64(cmdline, "frames", 16);
	use_ecam = arg_flag(cmdline, "ecam");
	use_evidx = arg_flag(cmdline, "evidx");
	use_indirect = arg_flag(cmdline, "indirect");
	use_irq = arg_flag(cmdline, "irq");
	if (arg_flag(cmdline, "bench=blk") || arg_flag(cmdline, "bench=net")
	    || arg_flag(cmdline, "bench=netrx"))
		qlimit = QSIZE;
	struct dev *blk = 0, *rng = 0, *con = 0, *net = 0, *vs = 0;
	int n = 0;
	for (int slot = 1; slot < 32 && n < MAXDEV; slot++) {
		if (probe(&devs[n], slot, &queues[3 * n])) {
			if (devs[n].type == 2)
				blk = &devs[n];
			else if (devs[n].type == 4)
				rng = &devs[n];
			else if (devs[n].type == 3)
				con = &devs[n];
			else if (devs[n].type == 1)
				net = &devs[n];
			else if (devs[n].type == 19)
				vs = &devs[n];
			n++;
		}
	}
	puts_(use_ecam ? "virtio ready (ecam):" : "virtio ready:");
	if (blk) {
		volatile uint64_t *cap = (volatile uint64_t *)blk->device;
		puts_(" blk sectors=");
		putu(*cap);
		if (*cap < blocks * (BLOCK / 512))
			blocks = *cap / (BLOCK / 512);
	}
	if (rng)
		puts_(" rng");
	if (con) {
		puts_(" console");
		con_rx_post(con);
	}
	if (net) {
		puts_(" net");
		net_start(net);
	}
	if (vs) {
		puts_(" vsock");
		vs_start(vs);
	}
	putc_('\n');
	if (blk && arg_flag(cmdline, "bench=blk"))
		blk_bench(blk, cmdline, *(volatile uint64_t *)blk->device);
	if (net && arg_flag(cmdline, "bench=net"))
		net_bench(net, cmdline);
	if (net && arg_flag(cmdline, "bench=netrx"))
		netrx_bench(net, cmdline);
	for (;;) {
		uint64_t r = ++round_no;
		uint64_t *w = (uint64_t *)blockbuf;
		for (uint64_t b = 0; blk && b < blocks; b++) {
			for (uint64_t k = 0; k < BLOCK / 8; k++)
				w[k] = word(r, b, k);
			w[0] = MAGIC;
			w[1] = r;
			w[2] = b;
			blk_io(blk, 1, b);
		}
		for (uint64_t b = 0; blk && b < blocks; b++) {
			memset(blockbuf, 0, BLOCK);
			blk_io(blk, 0, b);
			if (w[0] != MAGIC || w[1] != r || w[2] != b)
				fail("block header wrong: round, block", w[1], w[2]);
			for (uint64_t k = 3; k < BLOCK / 8; k++)
				if (w[k] != word(r, b, k))
					fail("block data wrong: block, word", b, k);
		}
		uint32_t got = 0;
		if (rng) {
			setd(rng->q[0], 0, rngbuf, sizeof rngbuf, 1);
			got = submit(rng, 1);
			int zero = 1;
			for (unsigned i = 0; i < sizeof rngbuf; i++)
				zero &= rngbuf[i] == 0;
			if (got != sizeof rngbuf || zero)
				fail("rng gave, zero", got, (uint64_t)zero);
		}
		if (con) {
			uint32_t len;
			con_line(con, "vcon ", r);
			if (used(con, 0, &len)) {  /* input came: echo it, offer the buffer again */
				char e[5 + sizeof rxbuf];
				memcpy(e, "echo:", 5);
				memcpy(e + 5, rxbuf, len > sizeof rxbuf ? sizeof rxbuf : len);
				con_write(con, e, 5 + (int)(len > sizeof rxbuf ? sizeof rxbuf : len));
				con_rx_post(con);
			}
		}
		if (net) {
			for (uint64_t i = 0; i < frames; i++)
				net_frame(net, r);
			puts_("net ");
			putu(r);
			putc_(' ');
			putu(net_got);
			putc_('\n');
		}
		if (vs) {
			while (vs_round(vs, r))
				;  /* a reset cut the connection: connect again */
			puts_("vsock ");
			putu(r);
			puts_(" ok\n");
		}
		puts_("V");
		putu(r);
		putc_(' ');
		putu(blk ? blocks : 0);
		putc_(' ');
		putu(got);
		putc_('\n');
		if (rounds && r >= rounds) {
			puts_("virtio done\n");
			poweroff();
		}
	}
}
