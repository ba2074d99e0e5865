//! Batched map operations (BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH),
//! which aya 0.16 does not wrap. One syscall moves thousands of elements instead of one or two
//! syscalls per element: the expiry sweep over a million-entry stick table and the swap of a
//! 65,537-slot Maglev table go from seconds and tens of milliseconds to a fraction of that.

use aya::{
    Pod,
    maps::{IterableMap, MapData},
};
use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn map_fd<M: IterableMap<K, V>, K: Pod, V>(map: &M) -> u32 {
    let data: &MapData = map.map();
    data.fd().as_fd().as_raw_fd() as u32
}

/// Runs one batch command; returns the count the kernel reports and whether it said ENOENT (the
/// end of the map for lookups).
fn batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<(u32, bool)> {
    // SAFETY: `attr` is a valid bpf_attr prefix for the batch commands; the pointers in it
    // reference buffers the caller keeps alive and sized for `count` elements.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc == 0 {
        return Ok((attr.count, false));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok((attr.count, true));
    }
    Err(err)
}

/// Every (key, value) of a hash map, `chunk` elements per syscall.
pub fn lookup_all<M, K, V>(map: &M, chunk: usize) -> io::Result<Vec<(K, V)>>
where
    M: IterableMap<K, V>,
    K: Pod + Default,
    V: Pod + Default,
{
    lookup_all_paced(map, chunk, std::time::Duration::ZERO)
}

/// [`lookup_all`] with a pause after each chunk: a background walk of a big table then takes
/// longer but competes less with the data path for memory bandwidth and cache.
pub fn lookup_all_paced<M, K, V>(
    map: &M,
    chunk: usize,
    pause: std::time::Duration,
) -> io::Result<Vec<(K, V)>>
where
    M: IterableMap<K, V>,
    K: Pod + Default,
    V: Pod + Default,
{
    let fd = map_fd(map);
    let mut out = Vec::new();
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // The batch cursor is opaque to user space; for hash maps it is a u32 bucket index.
    let mut cursor = [0u64; 1];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: cursor.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd,
            ..Default::default()
        };
        let (count, end) = batch(BPF_MAP_LOOKUP_BATCH, &mut attr)?;
        out.extend(
            keys[..count as usize]
                .iter()
                .copied()
                .zip(values[..count as usize].iter().copied()),
        );
        if end {
            return Ok(out);
        }
        first = false;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

/// Writes `keys[i] = values[i]` for all i in one syscall (per 64 Ki elements).
pub fn update<M, K, V>(map: &M, keys: &[K], values: &[V]) -> io::Result<()>
where
    M: IterableMap<K, V>,
    K: Pod,
    V: Pod,
{
    assert_eq!(keys.len(), values.len());
    let fd = map_fd(map);
    for (keys, values) in keys.chunks(65_536).zip(values.chunks(65_536)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd,
            ..Default::default()
        };
        let (done, _) = batch(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if done as usize != keys.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {done} of {}",
                keys.len()
            )));
        }
    }
    Ok(())
}

/// Deletes `keys`; returns how many were deleted. Keys already gone are skipped one by one (the
/// batch stops at the first missing key).
pub fn delete<M, K, V>(map: &M, keys: &[K]) -> io::Result<usize>
where
    M: IterableMap<K, V>,
    K: Pod,
    V: Pod,
{
    let fd = map_fd(map);
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(65_536)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd,
            ..Default::default()
        };
        let (done, missing) = batch(BPF_MAP_DELETE_BATCH, &mut attr)?;
        deleted += done as usize;
        // On ENOENT the kernel stopped at element `done`, which was already gone: skip it.
        let skip = done as usize + usize::from(missing);
        rest = &rest[skip.min(rest.len())..];
        if !missing && (done as usize) < chunk.len() {
            return Err(io::Error::other(format!(
                "batch delete stopped at {done} of {}",
                chunk.len()
            )));
        }
    }
    Ok(deleted)
}
