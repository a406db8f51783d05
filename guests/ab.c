/*
 * A-B memory guest (the method of QEMU's migration test): increment the first byte of
 * every 4 KiB page of a working set, one pass after another, and print 'B' per pass.
 * At any instant the first bytes read v for pages already done in this pass and v-1
 * for the rest, so a RAM image taken while paused proves memory was copied coherently.
 *
 * cmdline: ws=SIZE (default 64M)  start=ADDR (default 4M)  rate=MiB/s of dirtying (0: max)
 *          genid: print "G<counter> <id>" whenever the VM generation ID changes (restore,
 *                 clone; devices/genid.py), checked once per pass
 *          ro=SIZE: a region after the working set, filled once, then only read and
 *                 summed every pass (a clone shares it with its siblings)
 *          roevery=N: read the region every N passes only (default 1)
 */
#include "rt.h"

struct ab_info {
	uint64_t magic, magic_inv;    /* found by the host-side checker on a page boundary */
	uint64_t ws_start, ws_size, passes;
};
static struct ab_info info __attribute__((aligned(4096)));

#define AB_MAGIC 0x4241455659485950ULL /* "PYHYVEAB" */
#define GENID 0xFED02000UL
#define GENID_MAGIC 0x4449455659485950ULL /* "PYHYVEID" */

static uint64_t genid_seen;

static void genid_check(void)
{
	volatile uint64_t *g = (volatile uint64_t *)GENID;
	if (g[3] != GENID_MAGIC || g[2] == genid_seen)
		return;
	genid_seen = g[2];
	puts_("\nG");
	putu(genid_seen);
	putc_(' ');
	for (int i = 0; i < 16; i++)  /* byte by byte: the order `pyhyvectl --status` shows */
		puthex(((volatile uint8_t *)GENID)[i], 2);
	putc_('\n');
}

void main(const char *cmdline)
{
	uint64_t start = arg_u64(cmdline, "start", 4 << 20);
	uint64_t ws = arg_u64(cmdline, "ws", 64 << 20) & ~0xfffULL;
	uint64_t rate = arg_u64(cmdline, "rate", 0);
	uint64_t ro = arg_u64(cmdline, "ro", 0) & ~0xfffULL;
	uint64_t roevery = arg_u64(cmdline, "roevery", 1);
	int genid = arg_flag(cmdline, "genid");
	if (ram_top && start + ws > ram_top) {
		puts_("A-B: working set beyond RAM, clamped\n");
		ws = ram_top > start ? (ram_top - start) & ~0xfffULL : 0;
	}
	if (ram_top && start + ws + ro > ram_top) {
		puts_("A-B: read-only region beyond RAM, dropped\n");
		ro = 0;
	}
	volatile uint64_t *rop = (volatile uint64_t *)(start + ws);
	for (uint64_t i = 0; i < ro / 8; i++)
		rop[i] = i * 0x9E3779B97F4A7C15ULL + 1;
	info.ws_start = start;
	info.ws_size = ws;
	info.magic_inv = ~AB_MAGIC;
	info.magic = AB_MAGIC;
	puts_("A-B start ws=");
	putu(ws >> 20);
	puts_("M\n");
	/* pacing: at most `rate` MiB/s, checked every 256 pages; idle passes (ws=0) every 10 ms */
	uint64_t hz = (rate || !ws) ? tsc_hz() : 0;
	uint64_t tsc_per_256 = rate ? hz / rate : 0;  /* 256 pages = 1 MiB */
	for (;;) {
		uint64_t t = rdtsc();
		for (uint64_t off = 0; off < ws; off += 4096) {
			(*(volatile uint8_t *)(start + off))++;
			if (tsc_per_256 && (off & (255 * 4096)) == 255 * 4096) {
				t += tsc_per_256;
				while (rdtsc() < t)
					cpu_relax();
			}
		}
		int check = ro && roevery && info.passes % roevery == 0;
		uint64_t sum = 0;
		for (uint64_t i = 0; check && i < ro / 8; i++)
			sum += rop[i];
		info.passes++;
		if (check && sum != ro / 8 * (ro / 8 - 1) / 2 * 0x9E3779B97F4A7C15ULL + ro / 8)
			puts_("\nA-B: read-only region changed\n");
		putc_('B');
		if (genid)
			genid_check();
		if (!ws)
			delay_us(10000);
	}
}
