/* pyhyve guest kit runtime: console, command line, timing, SMP start, all at CPL3. */
#include "rt.h"

#define COM1 0x3f8
#define LAPIC 0xFEE00000UL

struct hvm_start_info {
	uint32_t magic, version, flags, nr_modules;
	uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	uint32_t memmap_entries, reserved;
};
struct hvm_memmap_entry { uint64_t addr, size; uint32_t type, reserved; };

extern volatile uint32_t cpu_count;
uint64_t ram_top;
static void (*volatile ap_fn)(int);
/* A ticket lock: each CPU takes a number and is served in order. The plain test-and-set
 * lock it replaces let one vCPU take the console again and again while another, slowed by
 * a loaded host, never got in (a 2-vCPU test saw CPU1 reach step ~1950 while CPU0 had not
 * printed step 20). */
static volatile uint32_t console_next, console_serving;

void *memset(void *d, int c, size_t n) { unsigned char *p = d; while (n--) *p++ = (unsigned char)c; return d; }
void *memcpy(void *d, const void *s, size_t n) { unsigned char *p = d; const unsigned char *q = s; while (n--) *p++ = *q++; return d; }

void putc_(char c)
{
	if (c == '\n')
		putc_('\r');
	while (!(inb(COM1 + 5) & 0x20))
		cpu_relax();
	outb(COM1, (uint8_t)c);
}

void puts_(const char *s) { while (*s) putc_(*s++); }

void putu(uint64_t v)
{
	char b[21]; int i = 20; b[i] = 0;
	do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
	puts_(b + i);
}

void puthex(uint64_t v, int digits)
{
	for (int i = digits - 1; i >= 0; i--)
		putc_("0123456789abcdef"[(v >> (4 * i)) & 15]);
}

void lock_console(void)
{
	uint32_t ticket = __atomic_fetch_add(&console_next, 1, __ATOMIC_RELAXED);
	while (__atomic_load_n(&console_serving, __ATOMIC_ACQUIRE) != ticket)
		cpu_relax();
}

void unlock_console(void)
{
	__atomic_store_n(&console_serving, console_serving + 1, __ATOMIC_RELEASE);
}

static const char *find_key(const char *s, const char *key)
{
	size_t n = 0;
	while (key[n]) n++;
	while (*s) {
		while (*s == ' ') s++;
		const char *w = s;
		size_t i = 0;
		while (i < n && w[i] == key[i]) i++;
		if (i == n && (w[n] == '=' || w[n] == ' ' || w[n] == 0))
			return w + n;
		while (*s && *s != ' ') s++;
	}
	return 0;
}

uint64_t arg_u64(const char *cmdline, const char *key, uint64_t dflt)
{
	const char *p = find_key(cmdline, key);
	if (!p || *p != '=')
		return dflt;
	p++;
	uint64_t v = 0;
	while (*p >= '0' && *p <= '9') v = v * 10 + (uint64_t)(*p++ - '0');
	switch (*p) {
	case 'G': case 'g': v <<= 10; /* fall through */
	case 'M': case 'm': v <<= 10; /* fall through */
	case 'K': case 'k': v <<= 10;
	}
	return v;
}

int arg_flag(const char *cmdline, const char *word) { return find_key(cmdline, word) != 0; }

static uint64_t tsc_freq;

uint64_t tsc_hz(void)
{
	if (tsc_freq)
		return tsc_freq;
	/* PIT channel 2, mode 0, 10 ms; bounded so a machine without port 0x61 still moves on. */
	outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01));
	outb(0x43, 0xB0);
	outb(0x42, 11932 & 0xff);
	outb(0x42, 11932 >> 8);
	uint64_t t0 = rdtsc();
	for (long i = 0; i < 10000000; i++) {
		if (inb(0x61) & 0x20) {
			tsc_freq = (rdtsc() - t0) * 100;
			return tsc_freq;
		}
	}
	tsc_freq = 2000000000ULL;
	return tsc_freq;
}

void delay_us(uint64_t us)
{
	uint64_t end = rdtsc() + tsc_hz() / 1000000 * us;
	while (rdtsc() < end)
		cpu_relax();
}

static void lapic_write(uint32_t reg, uint32_t v) { *(volatile uint32_t *)(LAPIC + reg) = v; }
static uint32_t lapic_read(uint32_t reg) { return *(volatile uint32_t *)(LAPIC + reg); }

static void send_ipi(uint32_t icr)
{
	lapic_write(0x310, 0);
	lapic_write(0x300, icr);
	while (lapic_read(0x300) & (1u << 12))
		cpu_relax();
}

int smp_boot(int ncpus, void (*fn)(int cpu))
{
	if (ncpus <= 1)
		return 1;
	ap_fn = fn;
	lapic_write(0xF0, lapic_read(0xF0) | 0x100);     /* software-enable the LAPIC */
	send_ipi(0x000C4500);                            /* INIT, all excluding self */
	for (volatile int i = 0; i < 100000; i++) ;
	send_ipi(0x000C4608);                            /* SIPI, vector 0x08 -> 0x8000 */
	send_ipi(0x000C4608);
	uint64_t end = rdtsc() + 4000000000ULL;
	while (cpu_count < (uint32_t)ncpus && rdtsc() < end)
		cpu_relax();
	return (int)cpu_count;
}

long kit_syscall(long nr)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr) : "rcx", "rdx", "r10", "r11", "memory");
	return ret;
}

void poweroff(void)
{
	for (;;)
		outb(0x64, 0xFE);
}

void rt_ap_start(int cpu)
{
	while (!ap_fn)
		cpu_relax();
	ap_fn(cpu);
	for (;;)
		cpu_relax();
}

void rt_start(struct hvm_start_info *si)
{
	const char *cmdline = "";
	if (si && si->magic == 0x336ec578) {
		if (si->cmdline_paddr)
			cmdline = (const char *)si->cmdline_paddr;
		struct hvm_memmap_entry *mm = (struct hvm_memmap_entry *)si->memmap_paddr;
		for (uint32_t i = 0; si->version >= 1 && mm && i < si->memmap_entries; i++)
			if (mm[i].type == 1 && mm[i].addr + mm[i].size > ram_top)
				ram_top = mm[i].addr + mm[i].size;
	}
	main(cmdline);
	poweroff();
}
