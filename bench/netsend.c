/* Flood a tap device with Ethernet frames from the host side, for bench/devices.py's
 * receive rows: netsend IFNAME SIZE SECONDS. Frames go out in batches of 32 (sendmmsg
 * on a packet socket bound to the interface), with a 20 us sleep after each batch so the
 * sender leaves CPU time to the VMM it feeds (at most about 1.6 million frames a
 * second). Prints the frames the kernel accepted. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 32

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: netsend IFNAME SIZE SECONDS\n");
		return 2;
	}
	int size = atoi(argv[2]);
	double secs = atof(argv[3]);
	if (size < 60 || size > 1514 || secs <= 0) {
		fprintf(stderr, "netsend: SIZE must be 60-1514 and SECONDS positive\n");
		return 2;
	}
	int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
	if (s < 0) {
		perror("netsend: socket");
		return 1;
	}
	struct sockaddr_ll at = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
				 .sll_ifindex = (int)if_nametoindex(argv[1])};
	if (!at.sll_ifindex || bind(s, (struct sockaddr *)&at, sizeof at) < 0) {
		perror("netsend: bind");
		return 1;
	}
	static unsigned char frame[1514];
	memset(frame, 0xFF, 6);                                   /* broadcast */
	memcpy(frame + 6, "\x02\x00\x00\x00\x00\x01", 6);
	frame[12] = 0x88;                                         /* experimental EtherType */
	frame[13] = 0xB5;
	struct iovec iov = {frame, (size_t)size};
	struct mmsghdr msgs[BATCH];
	memset(msgs, 0, sizeof msgs);
	for (int i = 0; i < BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	unsigned long long sent = 0;
	struct timespec pause = {0, 20000};
	double end = now() + secs;
	while (now() < end) {
		int n = sendmmsg(s, msgs, BATCH, 0);
		if (n > 0)
			sent += (unsigned long long)n;
		nanosleep(&pause, NULL);
	}
	printf("%llu\n", sent);
	return 0;
}
