/* pyhyve guest kit: the ring-3 runtime shared by every kit guest. */
#ifndef RT_H
#define RT_H
#include <stdint.h>
#include <stddef.h>

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint64_t rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

void putc_(char c);
void puts_(const char *s);
void putu(uint64_t v);
void puthex(uint64_t v, int digits);
void lock_console(void);
void unlock_console(void);

/* cmdline helpers: "key=value" words; sizes take K/M/G suffixes. */
uint64_t arg_u64(const char *cmdline, const char *key, uint64_t dflt);
int arg_flag(const char *cmdline, const char *word);

uint64_t tsc_hz(void);           /* calibrated against PIT channel 2 on first use */
void delay_us(uint64_t us);
int smp_boot(int ncpus, void (*fn)(int cpu));   /* returns CPUs running, BSP included */
void poweroff(void) __attribute__((noreturn));  /* i8042 reset: the VMM stops the guest */
long kit_syscall(long nr);
void kit_wait_irq(void);          /* sleep (sti; hlt in kernel mode) until an interrupt */
#define KIT_IRQ_VECTOR 0x40      /* entry.S counts each interrupt on it in irq_count */
extern volatile uint64_t irq_count;

extern uint64_t ram_top;         /* end of the highest RAM range in the PVH memory map */
void main(const char *cmdline);  /* each guest provides it; runs at CPL3 on CPU 0 */
#endif
