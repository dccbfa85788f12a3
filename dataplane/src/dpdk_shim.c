/* The DPDK functions the dataplane calls that are static inline in DPDK's
 * headers (burst I/O, mbuf accessors) or need DPDK's structs, wrapped as
 * plain functions for Rust. Built only with the `dpdk` cargo feature. */
#include <string.h>
#include <rte_eal.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_bus_vdev.h>

int dp_eal_init(int argc, char **argv) { return rte_eal_init(argc, argv); }

/* Gives the calling (non-EAL) thread an lcore id, so mempool operations use a per-lcore cache. */
int dp_thread_register(void) { return rte_thread_register(); }

struct rte_mempool *dp_pool_create(const char *name, unsigned n)
{
    return rte_pktmbuf_pool_create(name, n, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id());
}

int dp_vdev_create(const char *name, const char *args) { return rte_vdev_init(name, args); }

int dp_port_by_name(const char *name, uint16_t *port) { return rte_eth_dev_get_port_by_name(name, port); }

/* One rx and one tx queue of `descs` descriptors, started, promiscuous. */
int dp_port_start(uint16_t port, uint16_t descs, struct rte_mempool *mp)
{
    struct rte_eth_conf conf;
    memset(&conf, 0, sizeof(conf));
    int rc = rte_eth_dev_configure(port, 1, 1, &conf);
    if (rc < 0) return rc;
    rc = rte_eth_rx_queue_setup(port, 0, descs, rte_eth_dev_socket_id(port), NULL, mp);
    if (rc < 0) return rc;
    rc = rte_eth_tx_queue_setup(port, 0, descs, rte_eth_dev_socket_id(port), NULL);
    if (rc < 0) return rc;
    rc = rte_eth_dev_start(port);
    if (rc < 0) return rc;
    rte_eth_promiscuous_enable(port);
    return 0;
}

void dp_port_close(uint16_t port)
{
    rte_eth_dev_stop(port);
    rte_eth_dev_close(port);
}

uint16_t dp_rx_burst(uint16_t port, struct rte_mbuf **pkts, uint16_t n) { return rte_eth_rx_burst(port, 0, pkts, n); }

uint16_t dp_tx_burst(uint16_t port, struct rte_mbuf **pkts, uint16_t n) { return rte_eth_tx_burst(port, 0, pkts, n); }

/* Copies a (possibly segmented) packet into buf; its length, or -1 when it does not fit. */
int dp_mbuf_copy_out(struct rte_mbuf *m, void *buf, uint32_t cap)
{
    uint32_t len = rte_pktmbuf_pkt_len(m);
    if (len > cap) return -1;
    const void *p = rte_pktmbuf_read(m, 0, len, buf);
    if (p == NULL) return -1;
    if (p != buf) memcpy(buf, p, len);
    return (int)len;
}

/* A new mbuf holding a copy of data, or NULL when the pool is empty or data is too long. */
struct rte_mbuf *dp_mbuf_from(struct rte_mempool *mp, const void *data, uint16_t len)
{
    struct rte_mbuf *m = rte_pktmbuf_alloc(mp);
    if (m == NULL) return NULL;
    char *p = rte_pktmbuf_append(m, len);
    if (p == NULL) {
        rte_pktmbuf_free(m);
        return NULL;
    }
    memcpy(p, data, len);
    return m;
}

void dp_mbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

/* Allocates n empty mbufs at once; data[i] is the data pointer of m[i] and
 * *room the bytes each may hold. Returns n, or 0 when the pool is short. */
unsigned dp_mbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **m, void **data, unsigned n, uint16_t *room)
{
    if (n == 0 || rte_pktmbuf_alloc_bulk(mp, m, n) != 0) return 0;
    for (unsigned i = 0; i < n; i++) data[i] = rte_pktmbuf_mtod(m[i], void *);
    *room = rte_pktmbuf_tailroom(m[0]);
    return n;
}

/* Gives m[i] the length lens[i] (0: not filled, freed instead) and transmits
 * the filled ones in order; frees what the driver refuses. Returns how many
 * the driver took. */
uint16_t dp_tx_filled(uint16_t port, struct rte_mbuf **m, const uint16_t *lens, uint16_t n)
{
    uint16_t k = 0;
    for (uint16_t i = 0; i < n; i++) {
        if (lens[i] == 0) {
            rte_pktmbuf_free(m[i]);
            continue;
        }
        m[i]->data_len = lens[i];
        m[i]->pkt_len = lens[i];
        m[k++] = m[i];
    }
    uint16_t sent = k ? rte_eth_tx_burst(port, 0, m, k) : 0;
    for (uint16_t j = sent; j < k; j++) rte_pktmbuf_free(m[j]);
    return sent;
}


