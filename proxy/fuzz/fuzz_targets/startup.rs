//! Fuzzes the startup-packet parser: any bytes, any split, never a panic, and a `Done` never
//! claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tendril_proxy::pgwire::{Parse, parse_first_packet};

fuzz_target!(|data: &[u8]| {
    for split in [data.len(), data.len() / 2, 1] {
        let end = split.min(data.len());
        if let Parse::Done(_, used) = parse_first_packet(&data[..end]) {
            assert!(used <= end);
        }
    }
});
