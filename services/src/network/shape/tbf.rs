//! The options of the kernel's token-bucket queue (`tbf`, net/sched/sch_tbf.c) as bytes: those
//! that make a tbf apply a [`Rate`], and the [`Rate`] a tbf's options say it applies. No IO.
//!
//! Netlink is native-endian: every number here is in this machine's byte order.

use std::fmt;

use crate::network::Rate;

/// The qdisc's kind (`TCA_KIND`).
pub(crate) const KIND: &str = "tbf";

/// `TCA_TBF_PARMS`: a `struct tc_tbf_qopt`.
const TCA_TBF_PARMS: u16 = 1;
/// `TCA_TBF_RATE64`: the rate in bytes per second when it does not fit the qopt's u32.
const TCA_TBF_RATE64: u16 = 4;
/// `TCA_TBF_BURST`: the bucket's size in bytes (the kernel computes its time itself).
const TCA_TBF_BURST: u16 = 6;
/// The flags in an attribute's type field (`NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `TC_LINKLAYER_ETHERNET`: the kernel computes a packet's time from its length and needs
/// no rate table.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// The length of `struct tc_tbf_qopt`.
const QOPT_LEN: usize = 36;
/// The kernel's scheduler ticks are 64 ns (`PSCHED_SHIFT` = 6).
const NS_PER_TICK: u64 = 64;
/// An Ethernet header, which the kernel counts in a frame's length on the link.
const ETH_HLEN: u32 = 14;
/// The least queue: some 40 full frames, so that a slow rate queues a burst of a TCP window
/// rather than dropping it.
pub(crate) const MIN_LIMIT: u32 = 64 * 1024;
/// The most queue: the memory a guest can make this domain hold for it.
pub(crate) const MAX_LIMIT: u32 = 16 * 1024 * 1024;

/// What a tbf is set to for a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tbf {
    /// The rate, bytes per second (at least 1).
    pub bytes_per_sec: u64,
    /// The bucket: the most bytes that pass at once after a quiet spell.
    pub burst: u32,
    /// The most bytes the queue holds while they wait for the bucket to fill; more are dropped.
    pub limit: u32,
}

impl Tbf {
    /// The tbf that applies `rate` on a link of MTU `mtu`. The bucket holds the rate's credit
    /// (`rate.burst_bytes()`) but at least one full frame (`mtu` + the Ethernet header), since
    /// the kernel drops a packet larger than the bucket. The queue holds one burst, within
    /// [`MIN_LIMIT`] and [`MAX_LIMIT`]: what a guest sends beyond its credit waits at most one
    /// interval, as it waits in netback's ring.
    pub(crate) fn for_rate(rate: Rate, mtu: u32) -> Tbf {
        let credit = u32::try_from(rate.burst_bytes()).unwrap_or(u32::MAX);
        let burst = credit.max(mtu.saturating_add(ETH_HLEN));
        Tbf { bytes_per_sec: rate.bytes_per_sec.max(1), burst, limit: burst.clamp(MIN_LIMIT, MAX_LIMIT) }
    }

    /// The attributes inside `TCA_OPTIONS`, as (type, value): `TCA_TBF_PARMS`,
    /// `TCA_TBF_RATE64` when the rate does not fit in 32 bits, and `TCA_TBF_BURST`.
    pub(crate) fn attributes(&self) -> Vec<(u16, Vec<u8>)> {
        let mut out = vec![(TCA_TBF_PARMS, self.qopt().to_vec())];
        if self.bytes_per_sec > u64::from(u32::MAX) {
            out.push((TCA_TBF_RATE64, self.bytes_per_sec.to_ne_bytes().to_vec()));
        }
        out.push((TCA_TBF_BURST, self.burst.to_ne_bytes().to_vec()));
        out
    }

    /// `struct tc_tbf_qopt` (include/uapi/linux/pkt_sched.h), 36 bytes:
    ///
    /// | offset | field                                         | here                      |
    /// |--------|-----------------------------------------------|---------------------------|
    /// | 0      | `rate`: `struct tc_ratespec`, 12 bytes:       |                           |
    /// | 0      | `  u8 cell_log`                               | 0                         |
    /// | 1      | `  u8 linklayer`                              | `TC_LINKLAYER_ETHERNET`   |
    /// | 2      | `  u16 overhead`, `i16 cell_align`, `u16 mpu` | 0                         |
    /// | 8      | `  u32 rate` (bytes/s)                        | the rate, at most u32::MAX|
    /// | 12     | `peakrate`: `struct tc_ratespec`              | 0 (no peak rate)          |
    /// | 24     | `u32 limit` (bytes)                           | the queue's limit         |
    /// | 28     | `u32 buffer` (ticks of 64 ns)                 | the bucket's time         |
    /// | 32     | `u32 mtu` (ticks; the peak rate's bucket)     | 0                         |
    ///
    /// The kernel replaces `buffer` with its own computation from `TCA_TBF_BURST`; it is
    /// filled in for the kernel that would not.
    pub(crate) fn qopt(&self) -> [u8; QOPT_LEN] {
        let mut q = [0u8; QOPT_LEN];
        q[1] = TC_LINKLAYER_ETHERNET;
        let rate32 = u32::try_from(self.bytes_per_sec).unwrap_or(u32::MAX);
        q[8..12].copy_from_slice(&rate32.to_ne_bytes());
        q[24..28].copy_from_slice(&self.limit.to_ne_bytes());
        let buffer_ns = u128::from(self.burst) * 1_000_000_000 / u128::from(self.bytes_per_sec.max(1));
        let ticks = u32::try_from(buffer_ns / u128::from(NS_PER_TICK)).unwrap_or(u32::MAX);
        q[28..32].copy_from_slice(&ticks.to_ne_bytes());
        q
    }
}

/// Why a tbf's options could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TbfError {
    /// An attribute's header says more bytes than there are, or fewer than a header.
    BadAttribute {
        /// Where it starts in the options.
        offset: usize,
    },
    /// No `TCA_TBF_PARMS`.
    NoParameters,
    /// An attribute of the wrong length.
    BadLength {
        /// Which attribute.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A rate of 0 bytes per second.
    ZeroRate,
}

impl fmt::Display for TbfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TbfError::BadAttribute { offset } => write!(f, "a malformed attribute at byte {offset}"),
            TbfError::NoParameters => f.write_str("no TCA_TBF_PARMS"),
            TbfError::BadLength { what, len } => write!(f, "{what} of {len} bytes"),
            TbfError::ZeroRate => f.write_str("a rate of 0 bytes/s"),
        }
    }
}

/// The [`Rate`] the tbf whose `TCA_OPTIONS` payload is `options` applies: its rate (the
/// qopt's, or `TCA_TBF_RATE64`'s when larger), and the interval its bucket holds at that rate.
///
/// The kernel keeps the bucket as a time in 64 ns ticks, which names an interval only to
/// within what one byte of bucket takes at the rate; of the whole microseconds that agree
/// with it, this is the roundest (a multiple of 1 ms if one agrees, then of 100 µs, 10 µs, 1 µs):
/// the interval set, for every interval in whole milliseconds. A bucket raised to one full
/// frame reads back as the interval that frame takes at the rate.
pub(crate) fn parse(options: &[u8]) -> Result<Rate, TbfError> {
    let (mut qopt, mut rate64, mut burst) = (None, None, None);
    let mut offset = 0;
    while options.len().saturating_sub(offset) >= 4 {
        let rest = &options[offset..];
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return Err(TbfError::BadAttribute { offset });
        }
        let value = &rest[4..len];
        match kind {
            TCA_TBF_PARMS => {
                // A longer struct from a later kernel starts with this one.
                let q: &[u8; QOPT_LEN] = value
                    .get(..QOPT_LEN)
                    .and_then(|q| q.try_into().ok())
                    .ok_or(TbfError::BadLength { what: "TCA_TBF_PARMS", len: value.len() })?;
                qopt = Some(*q);
            }
            TCA_TBF_RATE64 => {
                let v: [u8; 8] = value
                    .try_into()
                    .map_err(|_| TbfError::BadLength { what: "TCA_TBF_RATE64", len: value.len() })?;
                rate64 = Some(u64::from_ne_bytes(v));
            }
            TCA_TBF_BURST => {
                let v: [u8; 4] = value
                    .try_into()
                    .map_err(|_| TbfError::BadLength { what: "TCA_TBF_BURST", len: value.len() })?;
                burst = Some(u32::from_ne_bytes(v));
            }
            _ => {}
        }
        // Attributes are padded to 4 bytes; the last one's padding may be left out.
        offset = offset.saturating_add(len.next_multiple_of(4));
    }
    let q = qopt.ok_or(TbfError::NoParameters)?;
    let rate32 = u32::from_ne_bytes([q[8], q[9], q[10], q[11]]);
    let bytes_per_sec = u64::from(rate32).max(rate64.unwrap_or(0));
    if bytes_per_sec == 0 {
        return Err(TbfError::ZeroRate);
    }
    let per_byte_ns = 1_000_000_000u128.div_ceil(u128::from(bytes_per_sec));
    let (lo_ns, hi_ns) = match burst {
        // The interval whose credit is `burst` bytes: from `burst` to `burst + 1` bytes' time.
        Some(b) => {
            let lo = u128::from(b) * 1_000_000_000 / u128::from(bytes_per_sec);
            (lo, lo + per_byte_ns)
        }
        // The kernel's time for the bucket is at most the credit's, less than a tick (and a
        // few ns of its fixed-point division, for buckets up to seconds) short of it.
        None => {
            let ticks = u32::from_ne_bytes([q[28], q[29], q[30], q[31]]);
            let lo = u128::from(ticks) * u128::from(NS_PER_TICK);
            (lo, lo + u128::from(NS_PER_TICK) + 16 + per_byte_ns)
        }
    };
    Ok(Rate { bytes_per_sec, interval_us: roundest_us(lo_ns, hi_ns) })
}

/// The roundest whole number of microseconds from `lo_ns` to `hi_ns`, or the nearest to
/// `lo_ns` when none is within (saturated to u32).
fn roundest_us(lo_ns: u128, hi_ns: u128) -> u32 {
    let (lo, hi) = (lo_ns.div_ceil(1000), hi_ns / 1000);
    let us = [1000u128, 100, 10, 1]
        .into_iter()
        .map(|step| lo.div_ceil(step) * step)
        .find(|&us| us <= hi)
        .unwrap_or_else(|| (lo_ns + 500) / 1000);
    u32::try_from(us).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    /// Attributes as the kernel lays them out: header, value, padding to 4 bytes.
    fn encode(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, value) in attrs {
            let len = u16::try_from(4 + value.len()).unwrap();
            out.extend_from_slice(&len.to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(value);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        out
    }

    /// What the kernel answers for a tbf set to `tbf`: the qopt with the bucket's time as the
    /// kernel computes it from `TCA_TBF_BURST` (psched_l2t_ns's fixed point, then ticks),
    /// and RATE64 for a rate beyond 32 bits; no BURST.
    fn kernel_dump(tbf: &Tbf) -> Vec<u8> {
        let rate = tbf.bytes_per_sec;
        // psched_ratecfg_precompute__: mult and shift with ns = (len * mult) >> shift.
        let (mut factor, mut shift) = (1_000_000_000u64, 0u32);
        let mult = loop {
            let mult = factor / rate;
            if mult & (1 << 31) != 0 || factor & (1 << 63) != 0 {
                break mult;
            }
            factor <<= 1;
            shift += 1;
        };
        let ns = (u64::from(tbf.burst) * mult) >> shift;
        let mut q = tbf.qopt();
        q[28..32].copy_from_slice(&u32::try_from(ns / NS_PER_TICK).unwrap().to_ne_bytes());
        let mut attrs = vec![(TCA_TBF_PARMS, q.to_vec())];
        if rate >= 1 << 32 {
            attrs.push((TCA_TBF_RATE64, rate.to_ne_bytes().to_vec()));
        }
        encode(&attrs)
    }

    /// The qopt of 4M/s@50ms on a 1500-byte link, byte by byte (x86's and arm's order).
    #[cfg(target_endian = "little")]
    #[test]
    fn qopt_layout_of_a_known_rate() {
        let tbf = Tbf::for_rate("4M/s@50ms".parse().unwrap(), 1500);
        // 4 MiB/s × 50 ms = 209,715 bytes; the queue holds as much; the bucket's 49,999,952 ns
        // are 781,249 ticks.
        assert_eq!(tbf, Tbf { bytes_per_sec: 4 << 20, burst: 209_715, limit: 209_715 });
        #[rustfmt::skip]
        let want: [u8; 36] = [
            0, 1, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x40, 0x00, // rate: ethernet, 4,194,304 B/s
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,             // peakrate: none
            0x33, 0x33, 0x03, 0x00,                         // limit: 209,715
            0xc1, 0xeb, 0x0b, 0x00,                         // buffer: 781,249 ticks
            0, 0, 0, 0,                                     // mtu
        ];
        assert_eq!(tbf.qopt(), want);
        assert_eq!(
            tbf.attributes(),
            vec![(TCA_TBF_PARMS, want.to_vec()), (TCA_TBF_BURST, vec![0x33, 0x33, 0x03, 0x00])]
        );
    }

    /// A rate beyond 32 bits goes in RATE64, the qopt's saturated; the bucket and the queue
    /// are bounded.
    #[test]
    fn a_rate_beyond_32_bits_takes_rate64() {
        let tbf = Tbf::for_rate("5G/s@1ms".parse().unwrap(), 1500);
        assert_eq!(tbf.bytes_per_sec, 5 << 30);
        assert_eq!(tbf.burst, 5_368_709);
        assert_eq!(tbf.limit, 5_368_709);
        let attrs = tbf.attributes();
        assert_eq!(attrs[0].1[8..12], u32::MAX.to_ne_bytes());
        assert_eq!(attrs[1], (TCA_TBF_RATE64, (5u64 << 30).to_ne_bytes().to_vec()));
        assert_eq!(Tbf::for_rate("5G/s@500ms".parse().unwrap(), 1500).limit, MAX_LIMIT);
        // A slow rate's bucket holds one full frame, its queue the least.
        let slow = Tbf::for_rate("1K/s".parse().unwrap(), 9000);
        assert_eq!((slow.burst, slow.limit), (9014, MIN_LIMIT));
    }

    /// What the kernel answers reads back as the rate set, RATE64 and all.
    #[test]
    fn the_kernels_answer_reads_back_as_the_rate_set() {
        for r in ["4M/s@50ms", "10M/s", "100K/s@20ms", "1G/s@2ms", "5G/s@10ms", "7K/s@300ms", "3M/s@1234us"] {
            let rate: Rate = r.parse().unwrap();
            assert_eq!(parse(&kernel_dump(&Tbf::for_rate(rate, 1500))).unwrap(), rate, "{r}");
        }
        // TCA_TBF_BURST, when there is one, gives the interval in bytes.
        let tbf = Tbf::for_rate("4M/s@50ms".parse().unwrap(), 1500);
        assert_eq!(parse(&encode(&tbf.attributes())).unwrap(), "4M/s@50ms".parse().unwrap());
        // A bucket raised to a full frame reads back as that frame's time: 1514 B at 1 KiB/s.
        let floored = Tbf::for_rate("1K/s@50ms".parse().unwrap(), 1500);
        assert_eq!(parse(&kernel_dump(&floored)).unwrap(), "1K/s@1479ms".parse().unwrap());
    }

    /// Short, long, missing and zero fields are errors, never a panic or a wrong rate.
    #[test]
    fn malformed_options_are_errors() {
        let tbf = Tbf::for_rate("4M/s".parse().unwrap(), 1500);
        let q = tbf.qopt().to_vec();
        assert_eq!(parse(&[]), Err(TbfError::NoParameters));
        assert_eq!(parse(&[1, 2, 3]), Err(TbfError::NoParameters));
        assert_eq!(parse(&encode(&[(TCA_TBF_BURST, vec![0; 4])])), Err(TbfError::NoParameters));
        assert_eq!(
            parse(&encode(&[(TCA_TBF_PARMS, q[..35].to_vec())])),
            Err(TbfError::BadLength { what: "TCA_TBF_PARMS", len: 35 })
        );
        assert_eq!(
            parse(&encode(&[(TCA_TBF_PARMS, q.clone()), (TCA_TBF_RATE64, vec![0; 4])])),
            Err(TbfError::BadLength { what: "TCA_TBF_RATE64", len: 4 })
        );
        assert_eq!(
            parse(&encode(&[(TCA_TBF_PARMS, q.clone()), (TCA_TBF_BURST, vec![0; 8])])),
            Err(TbfError::BadLength { what: "TCA_TBF_BURST", len: 8 })
        );
        assert_eq!(parse(&encode(&[(TCA_TBF_PARMS, vec![0; 36])])), Err(TbfError::ZeroRate));
        // A header longer than what follows, and one shorter than itself.
        let mut long = encode(&[(TCA_TBF_PARMS, q.clone())]);
        long[0] = 41;
        assert_eq!(parse(&long), Err(TbfError::BadAttribute { offset: 0 }));
        let mut short = encode(&[(99, vec![]), (TCA_TBF_PARMS, q.clone())]);
        short[4] = 3;
        assert_eq!(parse(&short), Err(TbfError::BadAttribute { offset: 4 }));
        // A longer qopt from a later kernel, flags in the type and unknown attributes are fine.
        let mut longer = q.clone();
        longer.extend_from_slice(&[0xff; 8]);
        let ok = encode(&[(99, vec![1, 2, 3]), (TCA_TBF_PARMS | 0x8000, longer)]);
        assert_eq!(parse(&ok).unwrap().bytes_per_sec, 4 << 20);
    }

    proptest! {
        /// No bytes panic the parser.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
        }

        /// No attribute stream of arbitrary types and lengths panics it, and a rate it gives
        /// is never 0.
        #[test]
        fn arbitrary_attributes_never_panic(
            attrs in proptest::collection::vec((0u16..10, proptest::collection::vec(any::<u8>(), 0..48)), 0..6),
        ) {
            if let Ok(rate) = parse(&encode(&attrs)) {
                prop_assert!(rate.bytes_per_sec > 0);
            }
        }

        /// Every valid rate in whole milliseconds whose credit holds a full frame reads back
        /// from the kernel's answer as set (rates spread evenly over their magnitudes, 1 KiB/s to
        /// 64 GiB/s).
        #[test]
        fn whole_millisecond_rates_read_back(magnitude in 0u32..26, low in any::<u64>(), seed in any::<u64>()) {
            let bytes_per_sec = ((1u64 << magnitude) + low % (1u64 << magnitude)) * 1024;
            let least = (1514 * 1000u64).div_ceil(bytes_per_sec);
            let most = (u64::from(u32::MAX) * 1000 / bytes_per_sec).min(10_000);
            prop_assume!(least <= most);
            let ms = u32::try_from(least + seed % (most - least + 1)).unwrap();
            let rate = Rate { bytes_per_sec, interval_us: ms * 1000 };
            prop_assert!(rate.invalid().is_none() && rate.burst_bytes() >= 1514);
            prop_assert_eq!(parse(&kernel_dump(&Tbf::for_rate(rate, 1500))).unwrap(), rate);
        }
    }
}
