//! Short ASCII text (ids, decimal numbers, RFC 3339 times) formatted on the stack, copied where
//! it goes instead of allocated for each event.

use std::time::SystemTime;

/// Short ASCII text formatted on the stack (ids, times, numbers), to be copied where it goes
/// instead of allocated for each event.
#[derive(Clone, Copy)]
pub struct AsciiBuf<const N: usize> {
    /// The text, then unused zeros.
    bytes: [u8; N],
    /// How much of `bytes` is text.
    len: usize,
}

impl<const N: usize> AsciiBuf<N> {
    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("only ASCII is written")
    }
}

impl AsciiBuf<32> {
    /// `value` as 32 lowercase hex digits.
    pub fn hex(value: u128) -> AsciiBuf<32> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = AsciiBuf {
            bytes: [0; 32],
            len: 32,
        };
        for (i, byte) in out.bytes.iter_mut().enumerate() {
            *byte = DIGITS[(value >> (124 - 4 * i) & 0xf) as usize];
        }
        out
    }
}

impl AsciiBuf<20> {
    /// `value` in decimal.
    pub fn decimal(mut value: u64) -> AsciiBuf<20> {
        let mut digits = [0u8; 20];
        let mut start = 20;
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        let mut out = AsciiBuf {
            bytes: [0; 20],
            len: 20 - start,
        };
        out.bytes[..out.len].copy_from_slice(&digits[start..]);
        out
    }
}

/// `at` as RFC 3339 in UTC with microseconds, as `humantime::format_rfc3339_micros` writes it
/// (same days-from-2000-03-01 arithmetic), without a `String` and the `fmt` machinery per event.
/// `None` outside 1970..=9999, where humantime cannot format either.
pub fn rfc3339_micros(at: SystemTime) -> Option<AsciiBuf<27>> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let secs = since.as_secs();
    if secs >= 253_402_300_800 {
        return None;
    }
    const LEAPOCH: i64 = 11017;
    const DAYS_PER_400Y: i64 = 365 * 400 + 97;
    const DAYS_PER_100Y: i64 = 365 * 100 + 24;
    const DAYS_PER_4Y: i64 = 365 * 4 + 1;
    let days = (secs / 86400) as i64 - LEAPOCH;
    let secs_of_day = secs % 86400;
    let mut qc_cycles = days / DAYS_PER_400Y;
    let mut remdays = days % DAYS_PER_400Y;
    if remdays < 0 {
        remdays += DAYS_PER_400Y;
        qc_cycles -= 1;
    }
    let c_cycles = (remdays / DAYS_PER_100Y).min(3);
    remdays -= c_cycles * DAYS_PER_100Y;
    let q_cycles = (remdays / DAYS_PER_4Y).min(24);
    remdays -= q_cycles * DAYS_PER_4Y;
    let remyears = (remdays / 365).min(3);
    remdays -= remyears * 365;
    let mut year = 2000 + remyears + 4 * q_cycles + 100 * c_cycles + 400 * qc_cycles;
    let mut mon = 0;
    for mon_len in [31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, 29] {
        mon += 1;
        if remdays < mon_len {
            break;
        }
        remdays -= mon_len;
    }
    let mday = remdays + 1;
    let mon = if mon + 2 > 12 {
        year += 1;
        mon - 10
    } else {
        mon + 2
    };
    let micros = since.subsec_micros();
    let mut out = AsciiBuf {
        bytes: *b"0000-00-00T00:00:00.000000Z",
        len: 27,
    };
    let b = &mut out.bytes;
    let digit = |n: i64| b'0' + (n % 10) as u8;
    b[0] = digit(year / 1000);
    b[1] = digit(year / 100);
    b[2] = digit(year / 10);
    b[3] = digit(year);
    b[5] = digit(mon / 10);
    b[6] = digit(mon);
    b[8] = digit(mday / 10);
    b[9] = digit(mday);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    for (at, value) in [(11, hour), (14, minute), (17, second)] {
        b[at] = b'0' + (value / 10) as u8;
        b[at + 1] = b'0' + (value % 10) as u8;
    }
    let mut micros_left = micros;
    for i in (20..26).rev() {
        b[i] = b'0' + (micros_left % 10) as u8;
        micros_left /= 10;
    }
    Some(out)
}
