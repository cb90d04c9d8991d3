//! The network lock of `--tcp-established`: a tc classifier on the interfaces that carry the
//! dumped connections (ingress and egress) that drops every packet of a locked connection.
//!
//! CR_NETLOCK holds each locked connection twice, once per direction, keyed by the packet's
//! own (source, destination) as they appear on the wire, so a lookup needs no ordering. While
//! the lock holds, a peer's retransmissions never reach a socket that is gone (no RST), and the
//! dumped side sends nothing. The map and program are pinned in bpffs by cr-user/src/net/lock.rs
//! so they outlive `cr dump`.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};

/// One direction of a connection. Addresses are the raw wire bytes (an IPv4 address in the
/// first 4 bytes, the rest zero); ports are big-endian bytes; `family` is 4 or 6.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub family: u32,
}

#[map(name = "CR_NETLOCK")]
static CR_NETLOCK: HashMap<FlowKey, u8> = HashMap::with_max_entries(65536, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;

#[classifier]
pub fn cr_netlock(ctx: TcContext) -> i32 {
    match locked(&ctx) {
        Some(true) => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}

fn locked(ctx: &TcContext) -> Option<bool> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut key = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport: [0; 2],
        dport: [0; 2],
        family: 0,
    };
    let l4 = match proto {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
            if ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
                return Some(false);
            }
            let s: [u8; 4] = ctx.load(ETH_HLEN + 12).ok()?;
            let d: [u8; 4] = ctx.load(ETH_HLEN + 16).ok()?;
            key.src[..4].copy_from_slice(&s);
            key.dst[..4].copy_from_slice(&d);
            key.family = 4;
            ETH_HLEN + ((vihl & 0xf) as usize) * 4
        }
        ETH_P_IPV6 => {
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_TCP {
                return Some(false);
            }
            key.src = ctx.load(ETH_HLEN + 8).ok()?;
            key.dst = ctx.load(ETH_HLEN + 24).ok()?;
            key.family = 6;
            ETH_HLEN + 40
        }
        _ => return Some(false),
    };
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    key.sport = [ports[0], ports[1]];
    key.dport = [ports[2], ports[3]];
    // SAFETY: a plain lookup; the value is not used beyond presence.
    Some(unsafe { CR_NETLOCK.get(&key) }.is_some())
}
