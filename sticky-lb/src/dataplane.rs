//! The kernel side as the controller sees it: loading the XDP object, attaching it, pinning the
//! link and the maps, and reading and writing the maps.
//!
//! Pins live under `/sys/fs/bpf/sticky-lb/[<netns>/]<interface>/`: one file per map plus `link`,
//! the XDP link. While `link` is pinned the program stays attached with no process running; a new
//! controller reopens the pinned maps (so the stick table survives) and swaps its program into the
//! pinned link atomically.

use crate::service_index::{ServiceIndex, Slot};
use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use std::path::{Path, PathBuf};
use sticky_lb_common::{
    Backend, BackendCounters, BackendId, COUNTER_COUNT, MAX_SERVICES, SERVICE_INDEX_SLOTS,
    SERVICE_INDEX_TOMBSTONE, Service, ServiceCounters, ServiceId, ServiceKey, StickEntry, StickKey,
    map_names,
};
use tracing::{info, warn};

/// The compiled XDP object (sticky-lb-ebpf), embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("STICKY_LB_EBPF_OBJECT"));

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "sticky_lb";
/// A do-nothing XDP program in the same object (rig peers, benchmark floor).
pub const PASS_PROGRAM: &str = "xdp_pass";
/// The program the controller ends connections with (never attached; see `conntrack`).
pub const EXPIRE_PROGRAM: &str = "expire_flow";

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where one data path's pins live.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/sticky-lb/[<netns>/]<interface>`: interfaces in different namespaces may
    /// share a name, their pins must not.
    pub fn new(netns: Option<&str>, interface: &str) -> PinDir {
        let mut path = PathBuf::from(BPFFS).join("sticky-lb");
        if let Some(netns) = netns {
            path.push(netns);
        }
        PinDir(path.join(interface))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn link(&self) -> PathBuf {
        self.0.join("link")
    }

    /// Whether a data path is pinned here (attached, possibly with no controller running).
    pub fn is_attached(&self) -> bool {
        self.link().exists()
    }

    /// Removes the link pin (which detaches the program once no process holds the link) and the
    /// map pins, then the directory.
    pub fn remove(&self) -> Result<()> {
        let _ = std::fs::remove_file(self.link());
        for name in map_names::ALL {
            let _ = std::fs::remove_file(self.map(name));
        }
        match std::fs::remove_dir(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", self.0.display())),
        }
        // The namespace's folder too, once no other interface of it is pinned.
        if let Some(parent) = self.0.parent()
            && parent != Path::new(BPFFS).join("sticky-lb")
        {
            let _ = std::fs::remove_dir(parent);
        }
        Ok(())
    }
}

/// Mounts bpffs on /sys/fs/bpf if it is not there (a fresh machine has none).
pub fn ensure_bpffs() -> Result<()> {
    let path = std::ffi::CString::new(BPFFS).unwrap();
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    let fstype = std::ffi::CString::new("bpf").unwrap();
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs on {BPFFS}: {}",
            std::io::Error::last_os_error()
        );
    }
    info!("mounted bpffs on {BPFFS}");
    Ok(())
}

/// Sizes and constants fixed when the object is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub stick_table_size: u32,
    pub flow_table_size: u32,
    /// Slots per Maglev table copy (the largest table size of any service).
    pub maglev_stride: u32,
    /// Services the Maglev array has room for.
    pub maglev_services: u32,
    pub interface_mac: [u8; 6],
    /// aya-log level for the program's own log lines (0 = off .. 5 = trace).
    pub log_level: u8,
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
    /// A pinned link existed; the new program replaced the old one in it (mode unchanged).
    Replaced,
}

/// Attaches `program` to `interface` in `mode`: native (driver) or generic (skb) XDP, or `auto`,
/// native with a fallback to generic and a log line. The link stays with the program (dropping
/// or detaching it detaches); the balancer pins it, the decap program does not.
pub fn attach_in_mode(
    program: &mut Xdp,
    interface: &str,
    mode: crate::config::XdpMode,
) -> Result<(XdpLinkId, Attached)> {
    use crate::config::XdpMode as M;
    use aya::programs::XdpMode::{Driver, Skb};
    let name = std::ffi::CString::new(interface)?;
    Ok(match mode {
        M::Native => (program.attach(name.as_c_str(), Driver)?, Attached::Native),
        M::Generic => (program.attach(name.as_c_str(), Skb)?, Attached::Generic),
        M::Auto => match program.attach(name.as_c_str(), Driver) {
            Ok(id) => (id, Attached::Native),
            Err(e) => {
                warn!("native XDP on {interface} failed ({e}); falling back to generic mode");
                (program.attach(name.as_c_str(), Skb)?, Attached::Generic)
            }
        },
    })
}

/// The loaded program and typed handles on its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    /// `None` for a data path that is loaded but never pinned or attached (tests, benchmarks).
    pins: Option<PinDir>,
    options: LoadOptions,
    pub service_index: Array<MapData, u32>,
    pub services: Array<MapData, Service>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, BackendId>,
    /// What this process last wrote into each table copy (by its first slot), so a swap
    /// rewrites only the slots that differ: a backend change moves a fraction of a table.
    written: std::collections::HashMap<u32, Vec<BackendId>>,
}

/// Where a service sits, or would sit, in the service index.
enum IndexSlot {
    /// The slot holds the service; `params` is the services-array index it points at.
    Found { slot: u32, params: u32 },
    /// Not there; `slot` is where it goes.
    Free { slot: u32 },
}

impl Dataplane {
    /// Loads the object, reusing maps already pinned in `pins` (a previous controller's state) and
    /// pinning new ones there.
    pub fn load(pins: Option<PinDir>, options: LoadOptions) -> Result<Dataplane> {
        if let Some(pins) = &pins {
            std::fs::create_dir_all(pins.path())
                .with_context(|| format!("creating {}", pins.path().display()))?;
        }
        let maglev_slots = options
            .maglev_stride
            .checked_mul(2 * options.maglev_services)
            .ok_or_else(|| anyhow!("Maglev array too large"))?;
        let map_paths: Vec<(&str, PathBuf)> = match &pins {
            Some(pins) => map_names::ALL
                .iter()
                .map(|name| (*name, pins.map(name)))
                .collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::STICK, options.stick_table_size)
            .map_max_entries(map_names::FLOWS, options.flow_table_size)
            .map_max_entries(map_names::NAT, options.flow_table_size)
            .map_max_entries(map_names::MAGLEV, maglev_slots)
            .override_global("IFACE_MAC", &options.interface_mac, true)
            .override_global("AYA_LOG_LEVEL", &options.log_level, false);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
            anyhow!(
                "loading the XDP program: {e}{}",
                match &pins {
                    Some(pins) if pins.map(map_names::STICK).exists() => format!(
                        " (maps pinned in {} may come from a run with other sizes: \
                         `sticky-lb detach` removes them)",
                        pins.path().display()
                    ),
                    _ => String::new(),
                }
            )
        })?;
        let service_index = take(&mut ebpf, map_names::SERVICE_INDEX)?;
        let services = take(&mut ebpf, map_names::SERVICES)?;
        let backends = take(&mut ebpf, map_names::BACKENDS)?;
        let maglev = take(&mut ebpf, map_names::MAGLEV)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("program missing")?
            .try_into()?;
        program
            .load()
            .context("the kernel rejected the XDP program")?;
        let expire: &mut Xdp = ebpf
            .program_mut(EXPIRE_PROGRAM)
            .context("program expire_flow missing")?
            .try_into()?;
        expire
            .load()
            .context("the kernel rejected the expire_flow program")?;
        Ok(Dataplane {
            ebpf,
            pins,
            options,
            service_index,
            services,
            backends,
            maglev,
            written: std::collections::HashMap::new(),
        })
    }

    /// Starts aya-log forwarding of the program's log lines (debug level and below only).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Attaches to `interface` and pins the link, or, if a link is already pinned, swaps this
    /// program into it atomically (no packet sees no program).
    pub fn attach(&mut self, interface: &str, mode: crate::config::XdpMode) -> Result<Attached> {
        let link_pin = self
            .pins
            .as_ref()
            .context("an unpinned data path cannot attach")?
            .link();
        let program: &mut Xdp = self.ebpf.program_mut(PROGRAM).unwrap().try_into()?;
        if link_pin.exists() {
            match replace_in_pinned_link(program, &link_pin) {
                Ok(()) => return Ok(Attached::Replaced),
                // The link died with its interface (deleted and created again while no
                // controller ran): a new link on the interface of that name replaces it.
                Err(e) => {
                    warn!("the pinned link cannot take the program ({e:#}): attaching anew");
                    let _ = std::fs::remove_file(&link_pin);
                }
            }
        }
        let (link_id, attached) = attach_in_mode(program, interface, mode)?;
        let link: FdLink = program
            .take_link(link_id)?
            .try_into()
            .context("the kernel attached without a bpf_link (kernel older than 5.9?)")?;
        link.pin(&link_pin)
            .with_context(|| format!("pinning the link at {}", link_pin.display()))?;
        Ok(attached)
    }

    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// The XDP program (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(PROGRAM).unwrap().try_into().unwrap()
    }

    /// A handle that ends connections the way the data path does (for the sweep's thread).
    pub fn expirer(&self) -> Result<crate::conntrack::Expirer> {
        let program: &Xdp = self
            .ebpf
            .program(EXPIRE_PROGRAM)
            .context("program expire_flow missing")?
            .try_into()?;
        Ok(crate::conntrack::Expirer::new(program.fd()?.try_clone()?))
    }

    /// Loads another program of the object (the benchmark's reference programs) for test runs.
    pub fn extra_program(&mut self, name: &str) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load()?;
        }
        Ok(program)
    }

    /// Takes a map not held by `Dataplane` itself (stick table, counters) as a typed handle.
    pub fn take_map<T: TryFrom<Map, Error = aya::maps::MapError>>(
        &mut self,
        name: &str,
    ) -> Result<T> {
        take(&mut self.ebpf, name)
    }

    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// Records the map layout version in the pinned meta map (read before any later adoption).
    pub fn write_layout(&mut self, version: u32) -> Result<()> {
        let mut meta: Array<MapData, u32> = take(&mut self.ebpf, map_names::META)?;
        meta.set(0, &version, 0)?;
        Ok(())
    }

    /// Tells the data path what to look for beyond services (`FEATURE_*` bits, slot 0 of the
    /// features map).
    pub fn set_features(&mut self, features: u32) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::FEATURES)
            .with_context(|| format!("map {} missing", map_names::FEATURES))?;
        let mut array: Array<&mut MapData, u32> = Array::try_from(map)?;
        array.set(0, &features, 0)?;
        Ok(())
    }

    /// First slot of copy `half` (0 or 1) of a service's Maglev table.
    pub fn ring_base(&self, service: ServiceId, half: u32) -> u32 {
        (2 * service + half) * self.options.maglev_stride
    }

    /// Finds `key` in the service index, probing as the data path does.
    fn locate(&self, key: &ServiceKey) -> Result<IndexSlot> {
        let mut free = None;
        for slot in crate::service_index::probe_sequence(key) {
            let entry = self.service_index.get(&slot, 0)?;
            if entry == 0 || entry == SERVICE_INDEX_TOMBSTONE {
                free.get_or_insert(slot);
                if entry == 0 {
                    break; // the data path stops probing here too
                }
                continue;
            }
            let service = self.services.get(&(entry - 1), 0)?;
            // The family too: an IPv6 VIP can have the words of an IPv4 one (c612:64:: and
            // 198.18.0.100), and the data path tells them apart by it.
            if service.vip == key.vip
                && service.port == key.port
                && service.protocol == key.protocol
                && service.family == key.family
            {
                return Ok(IndexSlot::Found {
                    slot,
                    params: entry - 1,
                });
            }
        }
        match free {
            Some(slot) => Ok(IndexSlot::Free { slot }),
            None => bail!(
                "the service index has no free slot near this service's hash (too many colliding services)"
            ),
        }
    }

    /// A copy of the service index (plans are checked against it before anything is written).
    pub fn service_index(&self) -> Result<ServiceIndex> {
        let mut index = ServiceIndex::empty();
        for (slot, entry) in
            crate::batch::lookup_all(&self.service_index, SERVICE_INDEX_SLOTS as usize)?
        {
            let value = match entry {
                0 => Slot::Empty,
                SERVICE_INDEX_TOMBSTONE => Slot::Tombstone,
                params => {
                    let s = self.services.get(&(params - 1), 0)?;
                    Slot::Service(ServiceKey {
                        vip: s.vip,
                        port: s.port,
                        protocol: s.protocol,
                        family: s.family,
                    })
                }
            };
            index.set(slot, value);
        }
        Ok(index)
    }

    /// Forgets what this process wrote into the tables: the next publish of each rewrites it
    /// whole (after a failed write, whose slots may be half written).
    pub fn forget_written(&mut self) {
        self.written.clear();
    }

    /// Zeroes backend `id`'s packet counters and open-connection count: a new backend given an
    /// id starts from 0.
    pub fn reset_backend_counters(&mut self, id: BackendId) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let map = self
            .ebpf
            .map_mut(map_names::BACKEND_STATS)
            .context("map slb_backend_st missing")?;
        let mut stats: PerCpuArray<&mut MapData, BackendCounters> = PerCpuArray::try_from(map)?;
        stats.set(
            id,
            aya::maps::PerCpuValues::try_from(vec![
                BackendCounters::default();
                cpus.get() as usize
            ])?,
            0,
        )?;
        let map = self
            .ebpf
            .map_mut(map_names::ACTIVE)
            .context("map slb_active missing")?;
        let mut active: Array<&mut MapData, i64> = Array::try_from(map)?;
        active.set(id, &0, 0)?;
        Ok(())
    }

    /// Writes `slots` (a Maglev table, or the up backends of a least-connections service) into
    /// the inactive copy of the service's table and the service's parameters into their
    /// inactive copy, then points the service index at them: one aligned 32-bit store, so each
    /// packet sees the old service and table or the new ones. `service`'s address, ring base and
    /// size are set here.
    pub fn publish_service(
        &mut self,
        key: &ServiceKey,
        service: &mut Service,
        slots: &[BackendId],
    ) -> Result<()> {
        if slots.len() > self.options.maglev_stride as usize {
            bail!(
                "{} slots do not fit a table of {}",
                slots.len(),
                self.options.maglev_stride
            );
        }
        if service.id >= self.options.maglev_services || service.id >= MAX_SERVICES {
            bail!("service id {} beyond the Maglev array", service.id);
        }
        let location = self.locate(key)?;
        let (index_slot, current) = match location {
            IndexSlot::Found { slot, params } => (slot, Some(self.services.get(&params, 0)?)),
            IndexSlot::Free { slot } => (slot, None),
        };
        // The table copy and the parameters copy not in use now.
        let half = match current {
            Some(c) if c.id == service.id && c.ring_base == self.ring_base(service.id, 0) => 1,
            _ => 0,
        };
        let base = self.ring_base(service.id, half);
        // Only the slots that differ from what this copy holds, in one batched write (the whole
        // copy when this process has not written it yet).
        let (indexes, values): (Vec<u32>, Vec<BackendId>) = match self.written.get(&base) {
            Some(old) if old.len() == slots.len() => (base..)
                .zip(slots.iter().zip(old))
                .filter(|(_, (new, old))| new != old)
                .map(|(i, (new, _))| (i, *new))
                .unzip(),
            _ => ((base..base + slots.len() as u32).collect(), slots.to_vec()),
        };
        if let Err(e) = crate::batch::update(&self.maglev, &indexes, &values) {
            // Some slots may be written: the next publish of this copy rewrites all of it.
            self.written.remove(&base);
            return Err(e).context("writing the table");
        }
        self.written.insert(base, slots.to_vec());
        service.vip = key.vip;
        service.port = key.port;
        service.protocol = key.protocol;
        service.family = key.family;
        service.ring_base = base;
        service.ring_size = slots.len() as u32;
        let params = service.id * 2 + half;
        self.services.set(params, service, 0)?;
        self.service_index.set(index_slot, &(params + 1), 0)?;
        Ok(())
    }

    /// Takes a service out of the index (a tombstone keeps other services' probe chains whole).
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        if let IndexSlot::Found { slot, .. } = self.locate(key)? {
            self.service_index.set(slot, &SERVICE_INDEX_TOMBSTONE, 0)?;
        }
        Ok(())
    }

    /// The services the index holds (to find those a new config no longer has).
    pub fn service_keys(&self) -> Result<Vec<ServiceKey>> {
        let mut keys = Vec::new();
        for (slot, entry) in
            crate::batch::lookup_all(&self.service_index, SERVICE_INDEX_SLOTS as usize)?
        {
            let _ = slot;
            if entry == 0 || entry == SERVICE_INDEX_TOMBSTONE {
                continue;
            }
            let s = self.services.get(&(entry - 1), 0)?;
            keys.push(ServiceKey {
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                family: s.family,
            });
        }
        Ok(keys)
    }
}

/// Swaps `program` into the XDP link pinned at `link_pin` atomically (no packet sees no
/// program).
fn replace_in_pinned_link(program: &mut Xdp, link_pin: &Path) -> Result<()> {
    let fd_link: FdLink = PinnedLink::from_pin(link_pin)
        .with_context(|| format!("opening the pinned link {}", link_pin.display()))?
        .into();
    let link_id = program
        .attach_to_link(XdpLink::try_from(fd_link)?)
        .context("replacing the program in the pinned link")?;
    let link: FdLink = program.take_link(link_id)?.try_into()?;
    // The old pin still names the same link; pinning again would fail with EEXIST.
    drop(link);
    Ok(())
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing"))?;
    Ok(T::try_from(map)?)
}

/// Read-side handles on a pinned data path, for `table show`, `status` and the expiry sweep;
/// they work from any process while the controller runs (or after it left the data path running).
pub struct PinnedMaps {
    pub backends: Array<MapData, Backend>,
    pub stick: HashMap<MapData, StickKey, StickEntry>,
    pub stats: PerCpuArray<MapData, u64>,
    pub backend_stats: PerCpuArray<MapData, BackendCounters>,
    pub service_stats: PerCpuArray<MapData, ServiceCounters>,
    pub active: Array<MapData, i64>,
}

impl PinnedMaps {
    pub fn open(pins: &PinDir) -> Result<PinnedMaps> {
        if !pins.map(map_names::STICK).exists() {
            bail!(
                "no sticky-lb data path is pinned at {}",
                pins.path().display()
            );
        }
        Ok(PinnedMaps {
            backends: open_pinned(pins, map_names::BACKENDS)?,
            stick: open_pinned(pins, map_names::STICK)?,
            stats: open_pinned(pins, map_names::STATS)?,
            backend_stats: open_pinned(pins, map_names::BACKEND_STATS)?,
            service_stats: open_pinned(pins, map_names::SERVICE_STATS)?,
            active: open_pinned(pins, map_names::ACTIVE)?,
        })
    }

    /// Global counters summed over CPUs, indexed like `Counter`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..COUNTER_COUNT)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    pub fn backend_counters(&self, id: BackendId) -> Result<BackendCounters> {
        Ok(BackendCounters::sum(self.backend_stats.get(&id, 0)?.iter()))
    }

    pub fn service_counters(&self, id: ServiceId) -> Result<ServiceCounters> {
        Ok(ServiceCounters::sum(self.service_stats.get(&id, 0)?.iter()))
    }
}

pub fn open_pinned<T: TryFrom<Map, Error = aya::maps::MapError>>(
    pins: &PinDir,
    name: &str,
) -> Result<T> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(T::try_from(Map::from_map_data(data)?)?)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock `bpf_ktime_get_coarse_ns` reads, which the
/// data path stamps stick entries with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
