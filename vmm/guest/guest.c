/*
 * The VMM's test guest: a freestanding 64-bit program entered like a Linux
 * kernel (64-bit boot protocol, %rsi = boot parameters). It prints to the
 * 8250 serial port, finds its virtio-mmio devices on the kernel command line
 * (virtio_mmio.device=4K@0xADDR:IRQ, as Linux reads them), exercises
 * virtio-blk, answers ARP and ICMP echo on virtio-net, runs a DHCP client,
 * prints a heartbeat and powers off through the i8042 reset line.
 *
 * It must contain no SSE, MMX or x87 instruction (the build passes
 * -mgeneral-regs-only), and it is kept small because guest code runs slowly
 * on an emulating nested KVM.
 *
 * Command line words it understands (besides virtio_mmio.device=):
 *   guest.ip=A.B.C.D   static IPv4 address for the network device
 *   guest.dhcp         obtain the address with DHCP instead
 *   guest.hb=N         main-loop iterations between heartbeats
 *   guest.beats=N      power off after N heartbeats (0: run until stopped)
 *   guest.blkwrite     write the last disk sector and read it back
 *   guest.rngbytes=N   read N bytes from virtio-rng and print them
 *   guest.blkbeat      re-read the first disk sectors at every heartbeat
 *   guest.fill=MiB     write a pattern over guest memory from 4 MiB up (benchmarks)
 *   guest.blkbench=MiB read that much of the disk in 64 KiB requests (benchmarks)
 *   guest.vsock=PORT   accept vsock connections on PORT and echo what arrives
 *   guest.vsockconnect=PORT  connect to the host (CID 2) on PORT, say hello
 *                      and print the answer
 *   guest.flood=N      send N probe frames as fast as the device takes them
 *   guest.probe=N      send N probe frames (ethertype 0x88b5) and count the
 *                      ones that come back, as sent or with MACs swapped
 *
 * Built with -DHOSTILE it first feeds malformed requests to its devices.
 * Built with -DPVH it carries a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) whose
 * 32-bit entry builds its own page tables, enters long mode and reads the
 * command line from the hvm_start_info %ebx points at.
 *
 * Either way it reports the ACPI tables it finds through the RSDP (number of
 * enabled local APICs in the MADT, the IOAPIC address, the DSDT's size).
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

__asm__(".section .text.start\n"
        ".global _start\n"
        "_start:\n"
        "  lea stack_top(%rip), %rsp\n"
        "  mov %rsi, %rdi\n"
        "  call guest_main\n"
        "1: hlt\n"
        "  jmp 1b\n"
        ".bss\n"
        ".balign 16\n"
        "  .skip 16384\n"
        "stack_top:\n"
        ".text\n");


#ifdef PVH
/* ---- PVH entry: 32-bit protected mode, paging off, %ebx = start info ---- */
__asm__(".section .note.Xen, \"a\"\n"
        ".balign 4\n"
        ".long 4\n"           /* name size: "Xen\0" */
        ".long 4\n"           /* descriptor size: a 32-bit address */
        ".long 18\n"          /* XEN_ELFNOTE_PHYS32_ENTRY */
        ".asciz \"Xen\"\n"
        ".balign 4\n"
        ".long pvh_start\n"
        ".balign 4\n"
        ".text\n"
        ".code32\n"
        ".global pvh_start\n"
        "pvh_start:\n"
        "  mov %ebx, %esi\n"
        /* 4 GiB identity-mapped with 2 MiB pages */
        "  mov $pvh_pd, %edi\n"
        "  xor %eax, %eax\n"
        "  mov $2048, %ecx\n"
        "1:mov %eax, %edx\n"
        "  or $0x83, %edx\n"
        "  mov %edx, (%edi)\n"
        "  movl $0, 4(%edi)\n"
        "  add $0x200000, %eax\n"
        "  add $8, %edi\n"
        "  dec %ecx\n"
        "  jnz 1b\n"
        "  mov $pvh_pdpt, %edi\n"
        "  mov $pvh_pd, %eax\n"
        "  or $3, %eax\n"
        "  mov $4, %ecx\n"
        "2:mov %eax, (%edi)\n"
        "  movl $0, 4(%edi)\n"
        "  add $0x1000, %eax\n"
        "  add $8, %edi\n"
        "  dec %ecx\n"
        "  jnz 2b\n"
        "  mov $pvh_pdpt, %eax\n"
        "  or $3, %eax\n"
        "  mov %eax, pvh_pml4\n"
        "  movl $0, pvh_pml4+4\n"
        "  mov $pvh_pml4, %eax\n"
        "  mov %eax, %cr3\n"
        "  mov %cr4, %eax\n"
        "  or $0x20, %eax\n"          /* PAE */
        "  mov %eax, %cr4\n"
        "  mov $0xc0000080, %ecx\n"   /* EFER.LME */
        "  rdmsr\n"
        "  or $0x100, %eax\n"
        "  wrmsr\n"
        "  mov %cr0, %eax\n"
        "  or $0x80000001, %eax\n"    /* PG | PE */
        "  mov %eax, %cr0\n"
        "  lgdt pvh_gdt_desc\n"
        "  ljmp $0x08, $pvh_long\n"
        ".code64\n"
        "pvh_long:\n"
        "  mov $0x10, %eax\n"
        "  mov %eax, %ds\n"
        "  mov %eax, %es\n"
        "  mov %eax, %ss\n"
        "  lea stack_top(%rip), %rsp\n"
        "  mov %esi, %edi\n"
        "  call guest_main_pvh\n"
        "3:hlt\n"
        "  jmp 3b\n"
        ".section .rodata\n"
        ".balign 8\n"
        "pvh_gdt:\n"
        "  .quad 0, 0x00af9a000000ffff, 0x00cf92000000ffff\n"
        "pvh_gdt_desc:\n"
        "  .word 23\n"
        "  .long pvh_gdt\n"
        ".bss\n"
        ".balign 4096\n"
        "pvh_pml4: .skip 4096\n"
        "pvh_pdpt: .skip 4096\n"
        "pvh_pd: .skip 16384\n"
        ".text\n");
#endif

/* ---- freestanding helpers gcc may call ---- */
void *memset(void *d, int c, u64 n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *s, u64 n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}
u64 strlen(const char *s) {
    u64 n = 0;
    while (s[n]) n++;
    return n;
}
int memcmp(const void *a, const void *b, u64 n) {
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p - *q;
    return 0;
}

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }

/* ---- serial console ---- */
static void putc(char c) { outb(0x3f8, (u8)c); }
static void puts(const char *s) {
    while (*s) putc(*s++);
}
static void putdec(u64 v) {
    char b[24];
    int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc(b[--i]);
}
static void puthex(u64 v) {
    const char *d = "0123456789abcdef";
    int i, started = 0;
    puts("0x");
    for (i = 60; i >= 0; i -= 4) {
        int n = (int)((v >> i) & 15);
        if (n || started || i == 0) { putc(d[n]); started = 1; }
    }
}
static void putip(u32 ip) { /* network byte order in memory */
    u8 *b = (u8 *)&ip;
    putdec(b[0]); putc('.'); putdec(b[1]); putc('.'); putdec(b[2]); putc('.'); putdec(b[3]);
}

static void poweroff(void) {
    puts("guest: power off\n");
    outb(0x64, 0xfe); /* i8042: pulse the CPU reset line */
    for (;;) __asm__ volatile("hlt");
}

static u32 fnv1a(const u8 *p, u64 n) {
    u32 h = 2166136261u;
    while (n--) { h ^= *p++; h *= 16777619u; }
    return h;
}

/* ---- command line ---- */
static const char *cmdline;

static int starts(const char *s, const char *p) {
    while (*p) if (*s++ != *p++) return 0;
    return 1;
}
/* Returns the value after "key" in the command line, or 0. */
static const char *arg(const char *key) {
    const char *s = cmdline;
    while (s && *s) {
        while (*s == ' ') s++;
        if (starts(s, key)) return s + strlen(key);
        while (*s && *s != ' ') s++;
    }
    return 0;
}
static u64 parse_num(const char *s, const char **end) {
    u64 v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (;;) {
            char c = *s;
            if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
            else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v = v * 16 + (u64)(c - 'A' + 10);
            else break;
            s++;
        }
    } else {
        while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
    }
    if (end) *end = s;
    return v;
}
static u32 parse_ip(const char *s) {
    u32 ip = 0;
    u8 *b = (u8 *)&ip;
    int i;
    for (i = 0; i < 4; i++) {
        b[i] = (u8)parse_num(s, &s);
        if (*s == '.') s++;
    }
    return ip;
}

/* ---- virtio-mmio ---- */
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEV_FEAT 0x010
#define VM_DEV_FEAT_SEL 0x014
#define VM_DRV_FEAT 0x020
#define VM_DRV_FEAT_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS 0x060
#define VM_INT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC 0x080
#define VM_QUEUE_AVAIL 0x090
#define VM_QUEUE_USED 0x0a0
#define VM_CONFIG 0x100

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 64
#define ST_FAILED 128

#define QSZ 8
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSZ]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSZ]; u16 avail_event; };

struct vq {
    struct desc d[QSZ] __attribute__((aligned(16)));
    struct avail a __attribute__((aligned(4)));
    struct used u __attribute__((aligned(4096)));
    u16 last_used;
    u16 qidx;
    u64 base;
};

static int vq_setup(u64 base, struct vq *q, u16 idx) {
    memset(q, 0, sizeof(*q));
    q->base = base;
    q->qidx = idx;
    wr32(base + VM_QUEUE_SEL, idx);
    if (rd32(base + VM_QUEUE_NUM_MAX) < QSZ) return -1;
    wr32(base + VM_QUEUE_NUM, QSZ);
    wr32(base + VM_QUEUE_DESC, (u32)(u64)q->d);
    wr32(base + VM_QUEUE_DESC + 4, 0);
    wr32(base + VM_QUEUE_AVAIL, (u32)(u64)&q->a);
    wr32(base + VM_QUEUE_AVAIL + 4, 0);
    wr32(base + VM_QUEUE_USED, (u32)(u64)&q->u);
    wr32(base + VM_QUEUE_USED + 4, 0);
    wr32(base + VM_QUEUE_READY, 1);
    return 0;
}

/* Resets the device and negotiates VERSION_1 plus the given low feature bits. */
static int dev_init(u64 base, u32 want_low, u32 *got_low) {
    u32 f;
    wr32(base + VM_STATUS, 0);
    wr32(base + VM_STATUS, ST_ACK);
    wr32(base + VM_STATUS, ST_ACK | ST_DRIVER);
    wr32(base + VM_DEV_FEAT_SEL, 0);
    f = rd32(base + VM_DEV_FEAT) & want_low;
    wr32(base + VM_DEV_FEAT_SEL, 1);
    if (!(rd32(base + VM_DEV_FEAT) & 1)) return -1; /* VIRTIO_F_VERSION_1 */
    wr32(base + VM_DRV_FEAT_SEL, 0);
    wr32(base + VM_DRV_FEAT, f);
    wr32(base + VM_DRV_FEAT_SEL, 1);
    wr32(base + VM_DRV_FEAT, 1);
    wr32(base + VM_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
    if (!(rd32(base + VM_STATUS) & ST_FEATURES_OK)) return -1;
    if (got_low) *got_low = f;
    return 0;
}
static void dev_ready(u64 base) {
    wr32(base + VM_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

/* Makes chain head `head` available and notifies the device. */
static void vq_submit(struct vq *q, u16 head) {
    q->a.ring[q->a.idx % QSZ] = head;
    barrier();
    q->a.idx++;
    barrier();
    wr32(q->base + VM_QUEUE_NOTIFY, q->qidx);
}
static int vq_has_used(struct vq *q) {
    barrier();
    return *(volatile u16 *)&q->u.idx != q->last_used;
}
/* Waits for the next used element; returns its id, or -1 after `spins`. */
static int vq_wait(struct vq *q, u64 spins, u32 *len) {
    struct used_elem *e;
    while (!vq_has_used(q)) {
        if (spins-- == 0) return -1;
        __asm__ volatile("pause");
    }
    e = &q->u.ring[q->last_used % QSZ];
    if (len) *len = e->len;
    q->last_used++;
    if (rd32(q->base + VM_INT_STATUS)) wr32(q->base + VM_INT_ACK, 1);
    return (int)e->id;
}

static u64 blk_base, net_base, rng_base, vsock_base;

static void find_devices(void) {
    const char *s = cmdline;
    while (s && *s) {
        while (*s == ' ') s++;
        if (starts(s, "virtio_mmio.device=")) {
            const char *p = s + 19;
            u64 base;
            u32 id;
            parse_num(p, &p); /* size, e.g. 4K */
            while (*p && *p != '@') p++;
            if (*p != '@') goto next;
            base = parse_num(p + 1, &p);
            if (rd32(base + VM_MAGIC) != 0x74726976 || rd32(base + VM_VERSION) != 2) {
                puts("virtio: bad device at "); puthex(base); putc('\n');
                goto next;
            }
            id = rd32(base + VM_DEVICE_ID);
            puts("virtio: device "); putdec(id); puts(" at "); puthex(base); putc('\n');
            if (id == 2 && !blk_base) blk_base = base;
            if (id == 1 && !net_base) net_base = base;
            if (id == 4 && !rng_base) rng_base = base;
            if (id == 19 && !vsock_base) vsock_base = base;
        }
    next:
        while (*s && *s != ' ') s++;
    }
}

/* ---- virtio-blk ---- */
struct blk_hdr { u32 type; u32 reserved; u64 sector; };
static struct vq blkq;
static struct blk_hdr bhdr;
static u8 bstatus;
static u8 bbuf[4096] __attribute__((aligned(512)));
struct discard_seg { u64 sector; u32 num; u32 flags; };
static struct discard_seg bseg;

/* Issues one request; data may be 0 for flush. Returns the status byte. */
static int blk_req(u32 type, u64 sector, void *data, u32 len, int dev_writes) {
    int n;
    bhdr.type = type;
    bhdr.reserved = 0;
    bhdr.sector = sector;
    bstatus = 0xff;
    blkq.d[0].addr = (u64)&bhdr; blkq.d[0].len = 16; blkq.d[0].flags = DESC_F_NEXT; blkq.d[0].next = 1;
    n = 1;
    if (data) {
        blkq.d[1].addr = (u64)data; blkq.d[1].len = len;
        blkq.d[1].flags = DESC_F_NEXT | (dev_writes ? DESC_F_WRITE : 0); blkq.d[1].next = 2;
        n = 2;
    }
    blkq.d[n].addr = (u64)&bstatus; blkq.d[n].len = 1; blkq.d[n].flags = DESC_F_WRITE; blkq.d[n].next = 0;
    vq_submit(&blkq, 0);
    if (vq_wait(&blkq, 200000000, 0) < 0) return -1;
    return *(volatile u8 *)&bstatus;
}

static int blk_ready;

static void blk_read_head(void) {
    u64 cap = rd32(blk_base + VM_CONFIG) | ((u64)rd32(blk_base + VM_CONFIG + 4) << 32);
    u64 i = cap < 8 ? cap : 8;
    int st;
    if (!i) return;
    st = blk_req(0, 0, bbuf, (u32)(i * 512), 1);
    puts("blk: read sectors 0-"); putdec(i - 1); puts(" status="); putdec((u64)st);
    puts(" fnv="); puthex(fnv1a(bbuf, i * 512)); putc('\n');
}

static void blk_test(int write) {
    u32 feat = 0;
    u64 cap, last, i;
    int ro, st;
    /* RO (5), FLUSH (9), DISCARD (13) */
    if (dev_init(blk_base, (1u << 5) | (1u << 9) | (1u << 13), &feat) || vq_setup(blk_base, &blkq, 0)) {
        puts("blk: init failed\n");
        return;
    }
    dev_ready(blk_base);
    cap = rd32(blk_base + VM_CONFIG) | ((u64)rd32(blk_base + VM_CONFIG + 4) << 32);
    ro = (feat >> 5) & 1;
    puts("blk: capacity "); putdec(cap); puts(" sectors ro="); putdec(ro); putc('\n');
    blk_ready = 1;
    if (cap == 0) return;
    blk_read_head();
    if (!write) return;
    last = cap - 1;
    for (i = 0; i < 512; i++) bbuf[i] = (u8)(i * 7 + 3);
    memcpy(bbuf, "written by the vmm test guest", 29);
    st = blk_req(1, last, bbuf, 512, 0);
    puts("blk: write sector "); putdec(last); puts(" status="); putdec((u64)st);
    puts(" fnv="); puthex(fnv1a(bbuf, 512)); putc('\n');
    if (feat & (1u << 9)) {
        st = blk_req(4, 0, 0, 0, 0);
        puts("blk: flush status="); putdec((u64)st); putc('\n');
    }
    memset(bbuf, 0, 512);
    st = blk_req(0, last, bbuf, 512, 1);
    puts("blk: readback status="); putdec((u64)st); puts(" fnv="); puthex(fnv1a(bbuf, 512)); putc('\n');
    if ((feat & (1u << 13)) && cap > 2) {
        bseg.sector = cap - 2; bseg.num = 1; bseg.flags = 0;
        st = blk_req(11, 0, &bseg, sizeof(bseg), 0);
        puts("blk: discard sector "); putdec(cap - 2); puts(" status="); putdec((u64)st); putc('\n');
    }
}

/* ---- virtio-rng ---- */
static struct vq rngq;
static u8 rbuf[64];
static void rng_test(u32 n) {
    u32 len = 0, i;
    if (n > sizeof(rbuf)) n = sizeof(rbuf);
    if (dev_init(rng_base, 0, 0) || vq_setup(rng_base, &rngq, 0)) { puts("rng: init failed\n"); return; }
    dev_ready(rng_base);
    rngq.d[0].addr = (u64)rbuf; rngq.d[0].len = n; rngq.d[0].flags = DESC_F_WRITE;
    vq_submit(&rngq, 0);
    if (vq_wait(&rngq, 200000000, &len) < 0) { puts("rng: timeout\n"); return; }
    puts("rng: got "); putdec(len); puts(" bytes:");
    for (i = 0; i < len && i < n; i++) { putc(' '); putdec(rbuf[i]); }
    putc('\n');
}

/* ---- virtio-net ---- */
#define NET_HDR 12
#define BUFSZ 2048
static struct vq rxq, txq;
static u8 rxbuf[QSZ][BUFSZ] __attribute__((aligned(64)));
static u8 txbuf[BUFSZ] __attribute__((aligned(64)));
static u8 mac[6];
static u32 my_ip;
static u64 rx_packets, arp_replies, icmp_replies;

static u16 csum(const u8 *p, u32 n, u32 sum) {
    while (n > 1) { sum += (u32)p[0] << 8 | p[1]; p += 2; n -= 2; }
    if (n) sum += (u32)p[0] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static void rx_post(u16 i) {
    rxq.d[i].addr = (u64)rxbuf[i]; rxq.d[i].len = BUFSZ; rxq.d[i].flags = DESC_F_WRITE;
    rxq.a.ring[rxq.a.idx % QSZ] = i;
    barrier();
    rxq.a.idx++;
}

static int tx_busy;
/* Sends txbuf[NET_HDR .. NET_HDR+len) and waits until the device took it. */
static void net_send(u32 len) {
    if (tx_busy && vq_wait(&txq, 100000000, 0) < 0) { puts("net: tx timeout\n"); return; }
    memset(txbuf, 0, NET_HDR);
    txq.d[0].addr = (u64)txbuf; txq.d[0].len = NET_HDR + len; txq.d[0].flags = 0;
    vq_submit(&txq, 0);
    tx_busy = 1;
    if (vq_wait(&txq, 100000000, 0) < 0) puts("net: tx timeout\n");
    tx_busy = 0;
}

static int net_init(void) {
    u32 feat = 0, i;
    if (dev_init(net_base, 1u << 5, &feat)) return -1; /* VIRTIO_NET_F_MAC */
    if (vq_setup(net_base, &rxq, 0) || vq_setup(net_base, &txq, 1)) return -1;
    for (i = 0; i < 6; i++) mac[i] = rd8(net_base + VM_CONFIG + i);
    for (i = 0; i < QSZ; i++) rx_post((u16)i);
    dev_ready(net_base);
    wr32(net_base + VM_QUEUE_NOTIFY, 0);
    puts("net: mac ");
    for (i = 0; i < 6; i++) { const char *d = "0123456789abcdef"; if (i) putc(':'); putc(d[mac[i] >> 4]); putc(d[mac[i] & 15]); }
    putc('\n');
    return 0;
}

/* ---- DHCP client ---- */
static u32 dhcp_xid = 0x3c0ffee1, dhcp_offer, dhcp_server;
static int dhcp_state; /* 0 idle, 1 discovering, 2 requesting, 3 bound */

static void dhcp_send(int type) {
    u8 *e = txbuf + NET_HDR, *ip = e + 14, *udp = ip + 20, *d = udp + 8, *o;
    u32 dlen, i;
    memset(e, 0, 14 + 20 + 8 + 300);
    memset(e, 0xff, 6); memcpy(e + 6, mac, 6); e[12] = 0x08; e[13] = 0;
    d[0] = 1; d[1] = 1; d[2] = 6;
    memcpy(d + 4, &dhcp_xid, 4);
    d[10] = 0x80; /* broadcast flag */
    memcpy(d + 28, mac, 6);
    d[236] = 99; d[237] = 130; d[238] = 83; d[239] = 99;
    o = d + 240;
    *o++ = 53; *o++ = 1; *o++ = (u8)type;
    if (type == 3) {
        *o++ = 50; *o++ = 4; memcpy(o, &dhcp_offer, 4); o += 4;
        *o++ = 54; *o++ = 4; memcpy(o, &dhcp_server, 4); o += 4;
    }
    *o++ = 55; *o++ = 2; *o++ = 1; *o++ = 3;
    *o++ = 255;
    dlen = (u32)(o - d);
    if (dlen < 300) dlen = 300;
    udp[0] = 0; udp[1] = 68; udp[2] = 0; udp[3] = 67;
    udp[4] = (u8)((8 + dlen) >> 8); udp[5] = (u8)(8 + dlen);
    ip[0] = 0x45; ip[2] = (u8)((28 + dlen) >> 8); ip[3] = (u8)(28 + dlen); ip[8] = 64; ip[9] = 17;
    for (i = 16; i < 20; i++) ip[i] = 0xff;
    i = csum(ip, 20, 0); ip[10] = (u8)(i >> 8); ip[11] = (u8)i;
    net_send(14 + 28 + dlen);
}

static void dhcp_rx(u8 *d, u32 len) {
    u8 *o = d + 240, *end = d + len;
    int type = 0;
    u32 server = 0;
    if (len < 240 || d[0] != 2 || memcmp(d + 4, &dhcp_xid, 4)) return;
    while (o < end && *o != 255) {
        if (*o == 0) { o++; continue; }
        if (o + 2 > end || o + 2 + o[1] > end) break;
        if (o[0] == 53 && o[1] >= 1) type = o[2];
        if (o[0] == 54 && o[1] >= 4) memcpy(&server, o + 2, 4);
        o += 2 + o[1];
    }
    if (type == 2 && dhcp_state == 1) {
        memcpy(&dhcp_offer, d + 16, 4);
        dhcp_server = server;
        puts("dhcp: offer "); putip(dhcp_offer); putc('\n');
        dhcp_state = 2;
        dhcp_send(3);
    } else if (type == 5 && dhcp_state == 2) {
        memcpy(&my_ip, d + 16, 4);
        dhcp_state = 3;
        puts("dhcp: bound "); putip(my_ip); putc('\n');
    }
}

/* ---- probe frames: what a loopback or MAC-swapping peer returns ---- */
#define PROBE_TYPE 0x88b5
static const u8 probe_peer[6] = {0x02, 0x11, 0x22, 0x33, 0x44, 0x55};
static u64 probe_seen, probe_returned, probe_swapped, probe_last = ~0ul;

static void probe_send(u64 seq) {
    u8 *e = txbuf + NET_HDR;
    memcpy(e, probe_peer, 6); memcpy(e + 6, mac, 6); e[12] = PROBE_TYPE >> 8; e[13] = PROBE_TYPE & 0xff;
    memcpy(e + 14, "vmm-probe", 9);
    memcpy(e + 23, &seq, 8);
    memset(e + 31, 0x5a, 64 - 31);
    net_send(64);
}
static void probe_rx(u8 *e, u32 len) {
    u64 seq;
    if (len < 31 || memcmp(e + 14, "vmm-probe", 9)) return;
    memcpy(&seq, e + 23, 8);
    probe_seen++;
    if (seq == probe_last) return; /* a duplicate */
    probe_last = seq;
    probe_returned++;
    if (!memcmp(e, mac, 6) && !memcmp(e + 6, probe_peer, 6)) probe_swapped++;
}

static void net_poll(void);
static void probe_run(u64 n) {
    u64 i, spin;
    for (i = 0; i < n; i++) {
        probe_send(i);
        for (spin = 0; spin < 2000000 && probe_last != i; spin++) {
            net_poll();
            __asm__ volatile("pause");
        }
    }
    puts("probe: sent "); putdec(n); puts(" returned "); putdec(probe_returned);
    puts(" macswapped "); putdec(probe_swapped); puts(" frames "); putdec(probe_seen); putc('\n');
}

static void flood_run(u64 n) {
    u64 i;
    puts("flood: start\n");
    for (i = 0; i < n; i++) probe_send(i);
    puts("flood: sent "); putdec(n); putc('\n');
}

static void net_rx(u8 *f, u32 len) {
    u8 *e = f, *p;
    u16 type;
    rx_packets++;
    if (len < 14) return;
    type = (u16)(e[12] << 8 | e[13]);
    p = e + 14;
    if (type == PROBE_TYPE) { probe_rx(e, len); return; }
    if (type == 0x0806 && len >= 42 && my_ip) {
        /* ARP request for our address: answer it. */
        if (p[6] == 0 && p[7] == 1 && !memcmp(p + 24, &my_ip, 4)) {
            u8 *r = txbuf + NET_HDR;
            memcpy(r, e + 6, 6); memcpy(r + 6, mac, 6); r[12] = 8; r[13] = 6;
            memcpy(r + 14, p, 6); r[20] = 0; r[21] = 2;
            memcpy(r + 22, mac, 6); memcpy(r + 28, &my_ip, 4);
            memcpy(r + 32, p + 8, 10);
            net_send(42);
            arp_replies++;
        }
    } else if (type == 0x0800 && len >= 34) {
        u32 ihl = (u32)(p[0] & 15) * 4, tot = (u32)(p[2] << 8 | p[3]);
        u8 *l4 = p + ihl;
        if (ihl < 20 || tot < ihl || 14 + tot > len) return;
        if (p[9] == 1 && my_ip && !memcmp(p + 16, &my_ip, 4) && l4[0] == 8) {
            /* ICMP echo request: turn it around in place. */
            u8 *r = txbuf + NET_HDR, *rip = r + 14, *ricmp;
            u32 c;
            if (14 + tot > BUFSZ - NET_HDR) return;
            memcpy(r, e + 6, 6); memcpy(r + 6, mac, 6); r[12] = 8; r[13] = 0;
            memcpy(rip, p, tot);
            memcpy(rip + 12, p + 16, 4); memcpy(rip + 16, p + 12, 4);
            rip[8] = 64; rip[10] = rip[11] = 0;
            c = csum(rip, ihl, 0); rip[10] = (u8)(c >> 8); rip[11] = (u8)c;
            ricmp = rip + ihl;
            ricmp[0] = 0; ricmp[2] = ricmp[3] = 0;
            c = csum(ricmp, tot - ihl, 0); ricmp[2] = (u8)(c >> 8); ricmp[3] = (u8)c;
            net_send(14 + tot);
            icmp_replies++;
            if (icmp_replies <= 3 || (icmp_replies & (icmp_replies - 1)) == 0) {
                puts("net: echo reply "); putdec(icmp_replies); putc('\n');
            }
        } else if (p[9] == 17 && tot >= ihl + 8 && l4[2] == 0 && l4[3] == 68) {
            dhcp_rx(l4 + 8, tot - ihl - 8);
        }
    }
}

static void net_poll(void) {
    while (vq_has_used(&rxq)) {
        struct used_elem *u = &rxq.u.ring[rxq.last_used % QSZ];
        u16 id = (u16)u->id;
        u32 len = u->len;
        rxq.last_used++;
        if (id < QSZ && len > NET_HDR) net_rx(rxbuf[id] + NET_HDR, len - NET_HDR);
        if (id < QSZ) rx_post(id);
        wr32(net_base + VM_QUEUE_NOTIFY, 0);
    }
}


/* ---- virtio-vsock: a listener that echoes, and a client that says hello ---- */
struct vs_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
#define VS_HDR 44
#define VS_REQUEST 1
#define VS_RESPONSE 2
#define VS_RST 3
#define VS_SHUTDOWN 4
#define VS_RW 5
#define VS_CREDIT_UPDATE 6
#define VS_CREDIT_REQUEST 7
#define VS_NCONN 4
struct vs_conn { u32 lport, pport, fwd; int used, outgoing, up; };
static struct vq vsrxq, vstxq, vsevq;
static u8 vsrxbuf[QSZ][BUFSZ] __attribute__((aligned(64)));
static u8 vstxbuf[2 * BUFSZ] __attribute__((aligned(64)));
static u8 vsevbuf[8];
static u64 vs_cid;
static u32 vs_listen;
static struct vs_conn vs_conns[VS_NCONN];

static void vs_send(struct vs_conn *c, u16 op, u32 flags, const u8 *data, u32 len) {
    struct vs_hdr *h = (struct vs_hdr *)vstxbuf;
    if (len > sizeof(vstxbuf) - VS_HDR) len = sizeof(vstxbuf) - VS_HDR;
    memset(h, 0, VS_HDR);
    h->src_cid = vs_cid; h->dst_cid = 2;
    h->src_port = c->lport; h->dst_port = c->pport;
    h->len = len; h->type = 1; h->op = op; h->flags = flags;
    h->buf_alloc = 65536; h->fwd_cnt = c->fwd;
    if (len) memcpy(vstxbuf + VS_HDR, data, len);
    vstxq.d[0].addr = (u64)vstxbuf; vstxq.d[0].len = VS_HDR + len; vstxq.d[0].flags = 0;
    vq_submit(&vstxq, 0);
    if (vq_wait(&vstxq, 100000000, 0) < 0) puts("vsock: tx timeout\n");
}
static struct vs_conn *vs_find(u32 lport, u32 pport) {
    int i;
    for (i = 0; i < VS_NCONN; i++)
        if (vs_conns[i].used && vs_conns[i].lport == lport && vs_conns[i].pport == pport) return &vs_conns[i];
    return 0;
}
static struct vs_conn *vs_new(u32 lport, u32 pport, int outgoing) {
    int i;
    for (i = 0; i < VS_NCONN; i++) {
        if (!vs_conns[i].used) {
            struct vs_conn *c = &vs_conns[i];
            memset(c, 0, sizeof(*c));
            c->used = 1; c->lport = lport; c->pport = pport; c->outgoing = outgoing;
            return c;
        }
    }
    return 0;
}
static void vs_rx(struct vs_hdr *h, u8 *data, u32 avail) {
    struct vs_conn *c, tmp;
    u32 len = h->len < avail ? h->len : avail;
    if (h->dst_cid != vs_cid || h->type != 1) return;
    c = vs_find(h->dst_port, h->src_port);
    if (h->op == VS_REQUEST) {
        if (!c && h->dst_port == vs_listen && (c = vs_new(h->dst_port, h->src_port, 0))) {
            c->up = 1;
            vs_send(c, VS_RESPONSE, 0, 0, 0);
            puts("vsock: accepted port "); putdec(h->dst_port); puts(" from host port "); putdec(h->src_port); putc('\n');
        } else {
            tmp.lport = h->dst_port; tmp.pport = h->src_port; tmp.fwd = 0;
            vs_send(&tmp, VS_RST, 0, 0, 0);
        }
        return;
    }
    if (!c) {
        if (h->op != VS_RST) {
            tmp.lport = h->dst_port; tmp.pport = h->src_port; tmp.fwd = 0;
            vs_send(&tmp, VS_RST, 0, 0, 0);
        }
        return;
    }
    switch (h->op) {
    case VS_RESPONSE:
        if (c->outgoing && !c->up) {
            static const char hello[] = "hello from the guest\n";
            c->up = 1;
            puts("vsock: connected to host port "); putdec(c->pport); putc('\n');
            vs_send(c, VS_RW, 0, (const u8 *)hello, sizeof(hello) - 1);
        }
        break;
    case VS_RW: {
        u32 i;
        c->fwd += len;
        if (c->outgoing) {
            puts("vsock: host says ");
            for (i = 0; i < len; i++) if (data[i] != '\n') putc((char)data[i]);
            putc('\n');
        } else {
            puts("vsock: got "); putdec(len); puts(" bytes on port "); putdec(c->lport); putc('\n');
            vs_send(c, VS_RW, 0, data, len);
        }
        break;
    }
    case VS_CREDIT_REQUEST:
        vs_send(c, VS_CREDIT_UPDATE, 0, 0, 0);
        break;
    case VS_SHUTDOWN:
        puts("vsock: peer closed port "); putdec(c->lport); putc('\n');
        vs_send(c, VS_RST, 0, 0, 0);
        c->used = 0;
        break;
    case VS_RST:
        puts("vsock: reset port "); putdec(c->lport); putc('\n');
        c->used = 0;
        break;
    }
}
static void vs_post(u16 i) {
    vsrxq.d[i].addr = (u64)vsrxbuf[i]; vsrxq.d[i].len = BUFSZ; vsrxq.d[i].flags = DESC_F_WRITE;
    vsrxq.a.ring[vsrxq.a.idx % QSZ] = i;
    barrier();
    vsrxq.a.idx++;
}
static void vs_post_event(void) {
    vsevq.d[0].addr = (u64)vsevbuf; vsevq.d[0].len = sizeof(vsevbuf); vsevq.d[0].flags = DESC_F_WRITE;
    vsevq.a.ring[vsevq.a.idx % QSZ] = 0;
    barrier();
    vsevq.a.idx++;
}
static void vs_poll(void) {
    int i;
    while (vq_has_used(&vsrxq)) {
        struct used_elem *u = &vsrxq.u.ring[vsrxq.last_used % QSZ];
        u16 id = (u16)u->id;
        u32 len = u->len;
        vsrxq.last_used++;
        if (id < QSZ && len >= VS_HDR) vs_rx((struct vs_hdr *)vsrxbuf[id], vsrxbuf[id] + VS_HDR, len - VS_HDR);
        if (id < QSZ) vs_post(id);
        wr32(vsock_base + VM_QUEUE_NOTIFY, 0);
    }
    while (vq_has_used(&vsevq)) {
        vsevq.last_used++;
        puts("vsock: transport reset\n");
        for (i = 0; i < VS_NCONN; i++) vs_conns[i].used = 0;
        vs_post_event();
        wr32(vsock_base + VM_QUEUE_NOTIFY, 2);
    }
}
static int vs_init(void) {
    u32 i;
    if (dev_init(vsock_base, 0, 0)) return -1;
    if (vq_setup(vsock_base, &vsrxq, 0) || vq_setup(vsock_base, &vstxq, 1) || vq_setup(vsock_base, &vsevq, 2)) return -1;
    vs_cid = rd32(vsock_base + VM_CONFIG) | ((u64)rd32(vsock_base + VM_CONFIG + 4) << 32);
    for (i = 0; i < QSZ; i++) vs_post((u16)i);
    vs_post_event();
    dev_ready(vsock_base);
    wr32(vsock_base + VM_QUEUE_NOTIFY, 0);
    wr32(vsock_base + VM_QUEUE_NOTIFY, 2);
    puts("vsock: cid "); putdec(vs_cid); putc('\n');
    return 0;
}
static void vs_connect(u32 port) {
    struct vs_conn *c = vs_new(49152, port, 1);
    if (!c) return;
    vs_send(c, VS_REQUEST, 0, 0, 0);
}

/* ---- i8042: a Ctrl-Alt-Del from the host ---- */
static int kbd_e0;
static void kbd_poll(void) {
    while (inb(0x64) & 1) {
        u8 sc = inb(0x60);
        if (sc == 0xe0) { kbd_e0 = 1; continue; }
        if (kbd_e0 && sc == 0x71) {
            puts("guest: ctrl-alt-del\n");
            poweroff();
        }
        kbd_e0 = 0;
    }
}

static u8 bigbuf[65536] __attribute__((aligned(4096)));
static void blk_bench(u64 mib) {
    u64 sectors = mib * 2048, s, sum = 0;
    u64 cap = rd32(blk_base + VM_CONFIG) | ((u64)rd32(blk_base + VM_CONFIG + 4) << 32);
    if (sectors > cap) sectors = cap;
    puts("blkbench: start\n");
    for (s = 0; s + 128 <= sectors; s += 128) {
        if (blk_req(0, s, bigbuf, sizeof(bigbuf), 1) != 0) { puts("blkbench: error\n"); return; }
        sum += bigbuf[0];
    }
    puts("blkbench: done "); putdec(s * 512); puts(" bytes sum="); putdec(sum); putc('\n');
}

static void fill_memory(u64 mib) {
    u64 start = 4ul << 20, end = mib << 20, n;
    if (end <= start) return;
    n = (end - start) / 8;
    __asm__ volatile("rep stosq" : "+D"(start), "+c"(n) : "a"(0x5a5a5a5a5a5a5a5aul) : "memory");
    puts("guest: filled "); putdec(mib); puts(" MiB\n");
}

#ifdef HOSTILE
/* Feeds malformed requests to the block device and reports what it saw. */
static void hostile_case(const char *name, int which) {
    u32 st;
    if (dev_init(blk_base, 0, 0) || vq_setup(blk_base, &blkq, 0)) { puts("hostile: init failed\n"); return; }
    dev_ready(blk_base);
    bhdr.type = 0; bhdr.sector = 0; bstatus = 0xff;
    blkq.d[0].addr = (u64)&bhdr; blkq.d[0].len = 16; blkq.d[0].flags = DESC_F_NEXT; blkq.d[0].next = 1;
    blkq.d[1].addr = (u64)bbuf; blkq.d[1].len = 512; blkq.d[1].flags = DESC_F_NEXT | DESC_F_WRITE; blkq.d[1].next = 2;
    blkq.d[2].addr = (u64)&bstatus; blkq.d[2].len = 1; blkq.d[2].flags = DESC_F_WRITE; blkq.d[2].next = 0;
    switch (which) {
    case 0: blkq.d[1].addr = 0x7ffff0000000ul; break;           /* data outside guest memory */
    case 1: blkq.d[1].next = 200; break;                          /* next index past the table */
    case 2: blkq.d[2].flags = DESC_F_NEXT | DESC_F_WRITE; blkq.d[2].next = 0; break; /* a loop */
    case 3: blkq.a.idx = 100; break;                              /* avail index far ahead */
    case 4: blkq.d[0].len = 4; break;                             /* header too short */
    case 5: blkq.d[1].len = 0x40000000; break;                    /* huge length */
    case 6: blkq.a.ring[0] = 77; break;                           /* head index past the table */
    }
    if (which == 3) { barrier(); wr32(blk_base + VM_QUEUE_NOTIFY, 0); }
    else if (which == 6) { barrier(); blkq.a.idx++; barrier(); wr32(blk_base + VM_QUEUE_NOTIFY, 0); }
    else vq_submit(&blkq, 0);
    {
        u64 spin = 2000000;
        while (spin-- && !(rd32(blk_base + VM_STATUS) & ST_NEEDS_RESET) && !vq_has_used(&blkq)) __asm__ volatile("pause");
    }
    st = rd32(blk_base + VM_STATUS);
    puts("hostile: "); puts(name); puts(" status="); puthex(st);
    puts((st & ST_NEEDS_RESET) ? " needs-reset\n" : " ok\n");
}
static void hostile(void) {
    if (!blk_base) { puts("hostile: no block device\n"); return; }
    hostile_case("out-of-range-address", 0);
    hostile_case("next-out-of-table", 1);
    hostile_case("descriptor-loop", 2);
    hostile_case("avail-index-jump", 3);
    hostile_case("short-header", 4);
    hostile_case("huge-length", 5);
    hostile_case("head-out-of-table", 6);
    /* A queue whose rings lie outside guest memory. */
    dev_init(blk_base, 0, 0);
    wr32(blk_base + VM_QUEUE_SEL, 0);
    wr32(blk_base + VM_QUEUE_NUM, QSZ);
    wr32(blk_base + VM_QUEUE_DESC, 0xfff00000u); wr32(blk_base + VM_QUEUE_DESC + 4, 0x7fff);
    wr32(blk_base + VM_QUEUE_READY, 1);
    dev_ready(blk_base);
    wr32(blk_base + VM_QUEUE_NOTIFY, 0);
    puts("hostile: bad-ring-address status="); puthex(rd32(blk_base + VM_STATUS)); putc('\n');
    /* Registers out of range, odd widths, a queue size that is no power of two. */
    wr32(blk_base + 0x7f0, 0xdeadbeef);
    wr32(blk_base + VM_QUEUE_SEL, 9);
    wr32(blk_base + VM_QUEUE_NUM, 3);
    (void)rd32(blk_base + 0xffc);
    puts("hostile: done\n");
}
#endif


/* ---- ACPI: what the VMM's tables say ---- */
static void acpi_report(u64 rsdp) {
    u8 *r = (u8 *)rsdp, *x, *t;
    u32 i, n, len, cpus = 0, ioapic = 0;
    if (!rsdp || memcmp(r, "RSD PTR ", 8)) { puts("acpi: no rsdp\n"); return; }
    x = (u8 *)*(u64 *)(r + 24);
    if (memcmp(x, "XSDT", 4)) { puts("acpi: no xsdt\n"); return; }
    n = (*(u32 *)(x + 4) - 36) / 8;
    puts("acpi: rsdp "); puthex(rsdp);
    for (i = 0; i < n; i++) {
        t = (u8 *)*(u64 *)(x + 36 + 8 * i);
        len = *(u32 *)(t + 4);
        if (!memcmp(t, "APIC", 4)) {
            u32 o = 44;
            while (o + 2 <= len && t[o + 1] >= 2) {
                if (t[o] == 0 && (*(u32 *)(t + o + 4) & 1)) cpus++;
                if (t[o] == 1) ioapic = *(u32 *)(t + o + 4);
                o += t[o + 1];
            }
        }
        if (!memcmp(t, "FACP", 4)) {
            u8 *d = (u8 *)*(u64 *)(t + 140);
            if (!memcmp(d, "DSDT", 4)) { puts(" dsdt "); putdec(*(u32 *)(d + 4)); puts(" bytes"); }
        }
    }
    puts(" cpus "); putdec(cpus); puts(" ioapic "); puthex(ioapic); putc('\n');
}

static void guest_run(u64 rsdp);

void guest_main(u8 *boot_params) {
    cmdline = (const char *)(u64)*(u32 *)(boot_params + 0x228);
    puts("guest: hello\n");
    guest_run(*(u64 *)(boot_params + 0x070));
}

#ifdef PVH
void guest_main_pvh(u8 *start_info) {
    cmdline = (const char *)*(u64 *)(start_info + 24);
    puts("guest: hello\n");
    puts("guest: pvh entry magic "); puthex(*(u32 *)start_info);
    puts(" memmap "); putdec(*(u32 *)(start_info + 48)); puts(" entries\n");
    guest_run(*(u64 *)(start_info + 32));
}
#endif

static void guest_run(u64 rsdp) {
    u64 hb, beats, n = 0, beat = 0;
    const char *v;
    puts("guest: cmdline "); puts(cmdline); putc('\n');
    acpi_report(rsdp);
    find_devices();
#ifdef HOSTILE
    hostile();
#endif
    if (blk_base) blk_test(arg("guest.blkwrite") != 0);
    if (blk_ready && (v = arg("guest.blkbench="))) blk_bench(parse_num(v, 0));
    if ((v = arg("guest.fill="))) fill_memory(parse_num(v, 0));
    if (rng_base && (v = arg("guest.rngbytes="))) rng_test((u32)parse_num(v, 0));
    if (net_base) {
        if (net_init()) { puts("net: init failed\n"); net_base = 0; }
    }
    if (net_base && (v = arg("guest.ip="))) {
        my_ip = parse_ip(v);
        puts("net: address "); putip(my_ip); putc('\n');
    }
    if (net_base && arg("guest.dhcp")) { dhcp_state = 1; dhcp_send(1); }
    if (net_base && (v = arg("guest.probe="))) probe_run(parse_num(v, 0));
    if (net_base && (v = arg("guest.flood="))) flood_run(parse_num(v, 0));
    v = arg("guest.hb=");
    hb = v ? parse_num(v, 0) : 200000;
    v = arg("guest.beats=");
    beats = v ? parse_num(v, 0) : 0;
    if (vsock_base) {
        if (vs_init()) { puts("vsock: init failed\n"); vsock_base = 0; }
    }
    if (vsock_base && (v = arg("guest.vsock="))) vs_listen = (u32)parse_num(v, 0);
    if (vsock_base && (v = arg("guest.vsockconnect="))) vs_connect((u32)parse_num(v, 0));
    puts("guest: ready\n");
    for (;;) {
        if (net_base) net_poll();
        if (vsock_base) vs_poll();
        if (++n % 64 == 0) kbd_poll();
        if (n >= hb) {
            n = 0;
            beat++;
            puts("heartbeat "); putdec(beat); putc('\n');
            if (net_base && dhcp_state == 1 && beat % 4 == 0) dhcp_send(1);
            if (blk_ready && arg("guest.blkbeat")) blk_read_head();
            if (beats && beat >= beats) poweroff();
        }
        __asm__ volatile("pause");
    }
}
