// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* wiremesh network policy on a pod's host-side veth (tc clsact), in the spirit of Cilium's
 * bpf_lxc.c: the ingress hook of the host side sees what the pod sends (its egress), the
 * egress hook what the pod receives (its ingress).
 *
 *   wm_pol_ipcache  LPM {prefixlen, ip} -> {identity}: every endpoint's /32 in the mesh, the
 *                   CIDRs that rules name, the clusters' pod CIDRs ("unknown" until learnt)
 *   wm_pol_endpoints ifindex -> {endpoint, flags}: which directions of the pod are enforced
 *   wm_pol_rules    {endpoint, identity, proto, dir} -> port intervals, each with its verdict
 *                   (and a default for ports outside them), compiled in userspace from the
 *                   ordered policies (agent: the plan's policy section; clustermesh.verdict is
 *                   the reference it is checked against)
 *   wm_pol_ct       LRU {endpoint, dir, 5-tuple} -> last seen: a flow allowed (or not enforced)
 *                   in a direction passes from then on, and so do its replies (looked up
 *                   reversed), also where the other direction is enforced
 *   wm_pol_counts   per-CPU rule id -> packets decided by it (verdict counters)
 *   wm_pol_events   ring buffer: one event per dropped new flow (the observability work reads it)
 *
 * A miss in wm_pol_rules for a peer identity falls back to the endpoint's entry for
 * WM_ANY_IDENTITY; a miss there is a deny when the direction is enforced. A direction that is
 * not enforced passes everything (no policy selects the pod). Non-IPv4 frames (ARP) pass.
 */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define WM_ANY_IDENTITY 0xffffffff
#define WM_WORLD_IDENTITY 2
#define WM_MAX_INTERVALS 16
#define WM_DIR_INGRESS 0
#define WM_DIR_EGRESS 1
#define WM_ENFORCE_INGRESS 1
#define WM_ENFORCE_EGRESS 2
#define WM_ACTION_DENY 0
#define WM_ACTION_ALLOW 1
#define WM_CT_TIMEOUT_NS (300ULL * 1000000000ULL)

struct ipcache_key {
	__u32 prefixlen;
	__be32 ip;
};

struct ipcache_value {
	__u32 identity;
};

struct endpoint_value {
	__u32 endpoint;
	__u32 flags;		/* WM_ENFORCE_INGRESS | WM_ENFORCE_EGRESS */
};

struct rule_key {
	__u32 endpoint;
	__u32 identity;
	__u8 proto;		/* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 0: any other */
	__u8 dir;
	__u16 pad;
};

struct interval {
	__u16 lo;		/* destination port range, inclusive */
	__u16 hi;
	__u8 action;
	__u8 pad[3];
	__u32 rule;		/* the deciding rule's id (counters, events); 0: default deny */
};

struct rule_value {
	__u8 count;		/* intervals in use */
	__u8 default_action;	/* ports outside every interval */
	__u16 pad;
	__u32 default_rule;
	struct interval iv[WM_MAX_INTERVALS];
};

struct ct_key {
	__u32 endpoint;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

struct ct_value {
	__u64 last_seen;
};

struct drop_event {
	__u64 ts;
	__u32 endpoint;
	__u32 identity;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
	__u32 rule;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_pol_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct endpoint_value);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_pol_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct rule_key);
	__type(value, struct rule_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_pol_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_pol_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_pol_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_pol_events SEC(".maps");

static __always_inline void count(__u32 rule)
{
	__u64 one = 1, *c = bpf_map_lookup_elem(&wm_pol_counts, &rule);

	if (c)
		*c += 1;
	else
		bpf_map_update_elem(&wm_pol_counts, &rule, &one, BPF_NOEXIST);
}

static __always_inline __u32 identity_of(__be32 ip)
{
	struct ipcache_key k = { .prefixlen = 32, .ip = ip };
	struct ipcache_value *v = bpf_map_lookup_elem(&wm_pol_ipcache, &k);

	return v ? v->identity : WM_WORLD_IDENTITY;
}

/* The verdict for a new flow: 1 pass, 0 drop; *rule gets the deciding rule's id. */
static __always_inline int decide(__u32 endpoint, __u32 identity, __u8 proto, __u8 dir, __u16 port,
				  __u32 *rule)
{
	struct rule_key k = { .endpoint = endpoint, .identity = identity, .proto = proto, .dir = dir };
	struct rule_value *v = bpf_map_lookup_elem(&wm_pol_rules, &k);
	int i;

	if (!v) {
		k.identity = WM_ANY_IDENTITY;
		v = bpf_map_lookup_elem(&wm_pol_rules, &k);
	}
	if (!v) {
		*rule = 0;
		return 0;
	}
#pragma unroll
	for (i = 0; i < WM_MAX_INTERVALS; i++) {
		if (i >= v->count)
			break;
		if (port >= v->iv[i].lo && port <= v->iv[i].hi) {
			*rule = v->iv[i].rule;
			return v->iv[i].action == WM_ACTION_ALLOW;
		}
	}
	*rule = v->default_rule;
	return v->default_action == WM_ACTION_ALLOW;
}

static __always_inline int enforce(struct __sk_buff *skb, __u8 dir)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct endpoint_value *ep;
	struct ct_key ct = {}, rev = {};
	struct ct_value seen, *hit;
	__u32 ifindex = skb->ifindex, identity, rule = 0;
	__u16 port = 0;
	__u64 now;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ep = bpf_map_lookup_elem(&wm_pol_endpoints, &ifindex);
	if (!ep)
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return TC_ACT_OK;
	ct.endpoint = ep->endpoint;
	ct.saddr = ip->saddr;
	ct.daddr = ip->daddr;
	ct.proto = ip->protocol;
	ct.dir = dir;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
		__be16 *ports = (void *)ip + ip->ihl * 4;

		if ((void *)(ports + 2) > end)
			return TC_ACT_SHOT;
		ct.sport = ports[0];
		ct.dport = ports[1];
		port = bpf_ntohs(ports[1]);
	}
	now = bpf_ktime_get_ns();
	hit = bpf_map_lookup_elem(&wm_pol_ct, &ct);
	if (hit && now - hit->last_seen < WM_CT_TIMEOUT_NS) {
		hit->last_seen = now;
		return TC_ACT_OK;
	}
	/* a reply of a flow this endpoint opened (or accepted) in the other direction */
	rev.endpoint = ct.endpoint;
	rev.saddr = ct.daddr;
	rev.daddr = ct.saddr;
	rev.sport = ct.dport;
	rev.dport = ct.sport;
	rev.proto = ct.proto;
	rev.dir = dir ^ 1;
	hit = bpf_map_lookup_elem(&wm_pol_ct, &rev);
	if (hit && now - hit->last_seen < WM_CT_TIMEOUT_NS) {
		hit->last_seen = now;
		return TC_ACT_OK;
	}
	if (!(ep->flags & (dir == WM_DIR_INGRESS ? WM_ENFORCE_INGRESS : WM_ENFORCE_EGRESS))) {
		/* Not enforced this way, but its replies come back the other way, which may be: a
		 * pod under an ingress policy still gets the answers to what it opens itself. */
		seen.last_seen = now;
		bpf_map_update_elem(&wm_pol_ct, &ct, &seen, BPF_ANY);
		return TC_ACT_OK;
	}
	identity = identity_of(dir == WM_DIR_INGRESS ? ip->saddr : ip->daddr);
	{
		__u8 proto = ip->protocol;

		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP)
			proto = 0;
		if (decide(ep->endpoint, identity, proto, dir, port, &rule)) {
			count(rule);
			seen.last_seen = now;
			bpf_map_update_elem(&wm_pol_ct, &ct, &seen, BPF_ANY);
			return TC_ACT_OK;
		}
	}
	count(rule);
	{
		struct drop_event *e = bpf_ringbuf_reserve(&wm_pol_events, sizeof(*e), 0);

		if (e) {
			e->ts = now;
			e->endpoint = ep->endpoint;
			e->identity = identity;
			e->saddr = ct.saddr;
			e->daddr = ct.daddr;
			e->sport = ct.sport;
			e->dport = ct.dport;
			e->proto = ct.proto;
			e->dir = dir;
			e->pad = 0;
			e->rule = rule;
			bpf_ringbuf_submit(e, 0);
		}
	}
	return TC_ACT_SHOT;
}

/* attached to the host-side veth's ingress: what the pod sends */
SEC("tc")
int wm_pol_from_pod(struct __sk_buff *skb)
{
	return enforce(skb, WM_DIR_EGRESS);
}

/* attached to the host-side veth's egress: what the pod receives */
SEC("tc")
int wm_pol_to_pod(struct __sk_buff *skb)
{
	return enforce(skb, WM_DIR_INGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
