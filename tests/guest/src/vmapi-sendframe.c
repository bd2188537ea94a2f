/* vmapi-sendframe: the test guest sends Ethernet frames exactly as given.
 *
 * Usage (inside the test guest only): vmapi-sendframe IFACE HEX [COUNT]
 *   IFACE  the NIC to send on (e.g. eth0)
 *   HEX    one whole Ethernet frame, destination MAC first, as hex digits (no FCS)
 *   COUNT  how many times to send it, 100 ms apart (default 1, at most 10)
 * Prints "sent=N bytes=B" and exits 0, or says why not and exits 1 (2: usage).
 *
 * busybox can ping, arping and change addresses, but cannot write a neighbour
 * advertisement, a router advertisement or a DHCP server's reply; the probe CGI
 * (rootfs/www/cgi-bin/probe) hands this helper the frames the test built
 * (tests/guest/frames.py). tests/guest/build.py compiles it with gcc -static into the
 * guest's initramfs; the source is part of the image's cache key.
 *
 * The guard, the same as the PWRF helper's: only inside the test guest (kernel command
 * line vmapi_test_guest=1, the guest's settings file, a ramfs/tmpfs root) does it send
 * anything; anywhere else it refuses with exit 64 and touches nothing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/if_packet.h>
#include <linux/magic.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#define REFUSED "vmapi test guest: refused: only the test guest (kernel command line vmapi_test_guest=1) runs this; nothing was changed"
#define MARKER "vmapi_test_guest=1"
#define MIN_FRAME 14
#define MAX_FRAME 1514
#define MAX_COUNT 10

/* Whether this runs inside the test guest: the marker is a word of the kernel's command
 * line, the guest's settings file exists and the root is the initramfs (ramfs/tmpfs). */
static int in_test_guest(void) {
    char line[4096];
    FILE *cmdline = fopen("/proc/cmdline", "r");
    if (cmdline == NULL)
        return 0;
    size_t n = fread(line, 1, sizeof line - 1, cmdline);
    fclose(cmdline);
    line[n] = '\0';
    int marked = 0;
    char *rest = line;
    for (char *word; (word = strsep(&rest, " \t\n")) != NULL;)
        if (strcmp(word, MARKER) == 0)
            marked = 1;
    struct stat settings;
    struct statfs root;
    return marked && stat("/etc/vmapi-guest/env", &settings) == 0 && statfs("/", &root) == 0 &&
           (root.f_type == RAMFS_MAGIC || root.f_type == TMPFS_MAGIC);
}

static int nibble(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The frame's bytes from its hex digits; -1 when they are not a frame. */
static long unhex(const char *hex, unsigned char *frame) {
    size_t digits = strlen(hex);
    if (digits % 2 != 0 || digits / 2 < MIN_FRAME || digits / 2 > MAX_FRAME)
        return -1;
    for (size_t i = 0; i < digits / 2; i++) {
        int high = nibble(hex[2 * i]), low = nibble(hex[2 * i + 1]);
        if (high < 0 || low < 0)
            return -1;
        frame[i] = (unsigned char)(high << 4 | low);
    }
    return (long)(digits / 2);
}

int main(int argc, char **argv) {
    if (!in_test_guest()) {
        fprintf(stderr, "%s\n", REFUSED);
        return 64;
    }
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: vmapi-sendframe IFACE HEX [COUNT]\n");
        return 2;
    }
    unsigned char frame[MAX_FRAME];
    long size = unhex(argv[2], frame);
    int count = argc == 4 ? atoi(argv[3]) : 1;
    if (size < 0 || count < 1 || count > MAX_COUNT) {
        fprintf(stderr, "vmapi-sendframe: want %d..%d bytes of hex and a count of 1..%d\n",
                MIN_FRAME, MAX_FRAME, MAX_COUNT);
        return 2;
    }
    unsigned int ifindex = if_nametoindex(argv[1]);
    if (ifindex == 0) {
        fprintf(stderr, "vmapi-sendframe: no interface %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    /* protocol 0: this socket only sends, it receives nothing */
    int sock = socket(AF_PACKET, SOCK_RAW, 0);
    if (sock < 0) {
        fprintf(stderr, "vmapi-sendframe: socket: %s\n", strerror(errno));
        return 1;
    }
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = (int)ifindex,
                             .sll_halen = ETH_ALEN};
    memcpy(to.sll_addr, frame, ETH_ALEN);
    int sent = 0;
    for (int i = 0; i < count; i++) {
        if (i > 0)
            nanosleep(&(struct timespec){.tv_nsec = 100000000}, NULL);
        if (sendto(sock, frame, (size_t)size, 0, (struct sockaddr *)&to, sizeof to) != size) {
            fprintf(stderr, "vmapi-sendframe: sendto %s: %s\n", argv[1], strerror(errno));
            break;
        }
        sent++;
    }
    close(sock);
    printf("sent=%d bytes=%ld\n", sent, size);
    return sent == count ? 0 : 1;
}
