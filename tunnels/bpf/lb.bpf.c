// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* wiremesh socket load balancer: a service's virtual IP is translated to one of its backends
 * when a socket connects (TCP, connected UDP) or sends (unconnected UDP), before any packet
 * exists; replies and getpeername() are translated back so that the application only ever
 * sees the VIP. The map layout follows Cilium's (bpf/lib/lb.h, bpf/lib/common.h):
 *
 *   wm_lb4_services   {vip, dport, slot, proto} -> slot 0: {count, rev_nat_index}
 *                                                 slot N: {backend_id}
 *   wm_lb4_backends   backend_id -> {address, port, proto, cluster_id, flags}
 *   wm_lb4_reverse_sk {socket cookie, backend address, backend port} -> {vip, vport, rev_nat_index}
 *
 * Userspace (tunnels/bpf/lb.py) keeps slot 0's count last on the way up and first on the way
 * down, so a program never picks a slot that does not hold a backend yet.
 *
 * Byte order: addresses and ports are stored in network byte order, exactly as the kernel hands
 * them in struct bpf_sock_addr (user_ip4, and user_port's low 16 bits).
 */

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SYS_PROCEED 1

#define LB_SERVICE_MAP_MAX_ENTRIES 65536
#define LB_BACKEND_MAP_MAX_ENTRIES 65536
#define LB_REVERSE_SK_MAX_ENTRIES  65536

struct lb4_key {
	__be32 address;		/* service virtual IPv4 address */
	__be16 dport;		/* L4 port of the frontend */
	__u16 backend_slot;	/* 0: the service itself; 1..count: its backends */
	__u8 proto;		/* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];
};

struct lb4_service {
	__u32 backend_id;	/* slots 1..count: the backend's id */
	__u16 count;		/* slot 0: how many backend slots follow */
	__u16 rev_nat_index;	/* slot 0: the service's id, kept in reverse-NAT entries */
	__u8 flags;
	__u8 pad[3];
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 cluster_id;	/* the cluster the backend lives in (1-255; 0: unknown) */
	__u8 flags;
	__u8 pad[3];
};

struct ipv4_revnat_tuple {
	__u64 cookie;		/* the socket's cookie */
	__be32 address;		/* the backend it was sent to */
	__be16 port;
	__u16 pad;
};

struct ipv4_revnat_entry {
	__be32 address;		/* the VIP the application asked for */
	__be16 port;
	__u16 rev_nat_index;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, LB_SERVICE_MAP_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_lb4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, LB_BACKEND_MAP_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_lb4_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv4_revnat_tuple);
	__type(value, struct ipv4_revnat_entry);
	__uint(max_entries, LB_REVERSE_SK_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_lb4_reverse_sk SEC(".maps");

static __always_inline struct lb4_service *lookup_service(__be32 vip, __be16 port, __u8 proto)
{
	struct lb4_key key = {
		.address = vip,
		.dport = port,
		.proto = proto,
	};
	struct lb4_service *svc = bpf_map_lookup_elem(&wm_lb4_services, &key);

	if (!svc || svc->count == 0)
		return NULL;	/* not a service, or no backend: leave the socket alone */
	return svc;
}

/* Forward translation: VIP -> backend. TCP draws a backend per connection; UDP derives it from
 * the socket cookie, so every datagram of one socket goes to the same backend (while the backend
 * count does not change). */
static __always_inline int xlate_fwd(struct bpf_sock_addr *ctx)
{
	__u8 proto = (__u8)ctx->protocol;
	__be32 vip = ctx->user_ip4;
	__be16 vport = (__be16)ctx->user_port;
	struct lb4_service *svc, *slot;
	struct lb4_backend *backend;
	struct lb4_key key = {};
	__u64 cookie;
	__u32 id;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	svc = lookup_service(vip, vport, proto);
	if (!svc)
		return SYS_PROCEED;

	cookie = bpf_get_socket_cookie(ctx);
	key.address = vip;
	key.dport = vport;
	key.proto = proto;
	if (proto == IPPROTO_TCP)
		key.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
	else
		key.backend_slot = (cookie % svc->count) + 1;

	slot = bpf_map_lookup_elem(&wm_lb4_services, &key);
	if (!slot)
		return SYS_PROCEED;
	id = slot->backend_id;
	backend = bpf_map_lookup_elem(&wm_lb4_backends, &id);
	if (!backend)
		return SYS_PROCEED;

	/* Remember the VIP for this socket and backend before rewriting: recvmsg4 and
	 * getpeername4 give it back. */
	struct ipv4_revnat_tuple rkey = {
		.cookie = cookie,
		.address = backend->address,
		.port = backend->port,
	};
	struct ipv4_revnat_entry rval = {
		.address = vip,
		.port = vport,
		.rev_nat_index = svc->rev_nat_index,
	};
	bpf_map_update_elem(&wm_lb4_reverse_sk, &rkey, &rval, BPF_ANY);

	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	return SYS_PROCEED;
}

/* Reverse translation: backend -> VIP, for a socket that connect4/sendmsg4 translated. An
 * entry whose service is gone (or was replaced: another rev_nat_index) is dropped. */
static __always_inline int xlate_rev(struct bpf_sock_addr *ctx)
{
	struct ipv4_revnat_tuple rkey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct ipv4_revnat_entry *rval;
	struct lb4_service *svc;

	struct lb4_key key = {};

	rval = bpf_map_lookup_elem(&wm_lb4_reverse_sk, &rkey);
	if (!rval)
		return SYS_PROCEED;
	/* Slot 0 only: a service left with no backend (count 0) still owns its sockets. */
	key.address = rval->address;
	key.dport = rval->port;
	key.proto = (__u8)ctx->protocol;
	svc = bpf_map_lookup_elem(&wm_lb4_services, &key);
	if (!svc || svc->rev_nat_index != rval->rev_nat_index) {
		bpf_map_delete_elem(&wm_lb4_reverse_sk, &rkey);
		return SYS_PROCEED;
	}
	ctx->user_ip4 = rval->address;
	ctx->user_port = rval->port;
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int wm_connect4(struct bpf_sock_addr *ctx)
{
	return xlate_fwd(ctx);
}

SEC("cgroup/sendmsg4")
int wm_sendmsg4(struct bpf_sock_addr *ctx)
{
	return xlate_fwd(ctx);
}

SEC("cgroup/recvmsg4")
int wm_recvmsg4(struct bpf_sock_addr *ctx)
{
	return xlate_rev(ctx);
}

SEC("cgroup/getpeername4")
int wm_getpeername4(struct bpf_sock_addr *ctx)
{
	return xlate_rev(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
