//! A program's event ring (`BPF_MAP_TYPE_RINGBUF`) read through libbpf: records decode into
//! the caller's event type; one consumer drains them. Shared by the kernel-forwarding paths.

use std::ffi::c_void;
use std::io;
use std::os::fd::RawFd;

use libbpf_rs::libbpf_sys;

/// Where the callback puts decoded records.
struct Sink<E> {
    decode: fn(&[u8]) -> Option<E>,
    events: Vec<E>,
}

/// An open event ring. `O` keeps the map's owner (and so its descriptor) alive.
pub struct Ring<E, O> {
    rb: *mut libbpf_sys::ring_buffer,
    sink: Box<Sink<E>>,
    _owner: O,
}

impl<E, O> std::fmt::Debug for Ring<E, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ring")
    }
}

// SAFETY: the ring buffer is only used through &mut self, by one thread at a time; E and O
// move with it.
unsafe impl<E: Send, O: Send> Send for Ring<E, O> {}

unsafe extern "C" fn on_record<E>(
    ctx: *mut c_void,
    data: *mut c_void,
    size: libbpf_sys::size_t,
) -> i32 {
    if ctx.is_null() || data.is_null() {
        return 0;
    }
    // SAFETY: ctx is the Sink set up in `Ring::open`; libbpf calls back on the thread that
    // consumes, while the Ring (which owns the Sink) is borrowed mutably by that call.
    let sink = unsafe { &mut *ctx.cast::<Sink<E>>() };
    // SAFETY: data points to a ring record of `size` bytes, valid during the callback.
    let record = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size as usize) };
    if let Some(event) = (sink.decode)(record) {
        sink.events.push(event);
    }
    0
}

impl<E, O> Ring<E, O> {
    /// Opens the ring of map `fd`, owned by `owner`; records `decode` rejects are skipped.
    pub(crate) fn open(fd: RawFd, decode: fn(&[u8]) -> Option<E>, owner: O) -> io::Result<Self> {
        let mut sink = Box::new(Sink {
            decode,
            events: Vec::new(),
        });
        let ctx: *mut Sink<E> = &mut *sink;
        // SAFETY: the callback receives `ctx`, which points into the boxed Sink owned by the
        // returned Ring (its heap address does not move) and outlives the ring buffer, freed
        // first in Drop. The map fd stays open as long as `owner` lives.
        let rb = unsafe {
            libbpf_sys::ring_buffer__new(fd, Some(on_record::<E>), ctx.cast(), std::ptr::null())
        };
        if rb.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Ring {
            rb,
            sink,
            _owner: owner,
        })
    }

    /// A descriptor that is readable when events are waiting (for epoll).
    pub fn fd(&self) -> RawFd {
        // SAFETY: rb is a live ring buffer until Drop.
        unsafe { libbpf_sys::ring_buffer__epoll_fd(self.rb) }
    }

    /// Takes every waiting event.
    pub fn drain(&mut self) -> Vec<E> {
        // SAFETY: rb is live; the callback writes into self.sink, which nothing else
        // borrows during this call.
        unsafe {
            libbpf_sys::ring_buffer__consume(self.rb);
        }
        std::mem::take(&mut self.sink.events)
    }
}

impl<E, O> Drop for Ring<E, O> {
    fn drop(&mut self) {
        // SAFETY: rb came from ring_buffer__new and is freed once.
        unsafe { libbpf_sys::ring_buffer__free(self.rb) }
    }
}

/// The `{u64, u32}` head both programs' events start with (native byte order).
pub(crate) fn cookie_and_kind(record: &[u8]) -> Option<(u64, u32)> {
    let cookie = u64::from_ne_bytes(record.get(0..8)?.try_into().ok()?);
    let kind = u32::from_ne_bytes(record.get(8..12)?.try_into().ok()?);
    Some((cookie, kind))
}
