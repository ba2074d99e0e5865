//! CPU time: the whole machine's from `/proc/stat` (not namespaced: it covers the load
//! generator, the balancer, the backends and the kernel's softirq work for all of them alike),
//! one process tree's or some of our own threads' from `/proc/PID/stat` (what the process
//! itself spent, user and system, without the softirq work the kernel happened to do while it
//! ran on another's behalf), and the CPUs a process tree may run on.

use anyhow::{Context, Result, bail};

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal: time the machine was working.
    pub busy: u64,
    /// busy + idle + iowait: all time of all CPUs.
    pub total: u64,
}

impl CpuTimes {
    pub fn now() -> Result<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse(&stat)
    }
}

/// CPU used between two readings.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDelta {
    /// Busy CPU-seconds over all CPUs.
    pub busy_seconds: f64,
    /// Busy share of all CPUs' time (1.0 = every CPU busy the whole time).
    pub utilisation: f64,
}

impl CpuDelta {
    pub fn between(before: CpuTimes, after: CpuTimes) -> CpuDelta {
        let busy = after.busy.saturating_sub(before.busy);
        let total = after.total.saturating_sub(before.total);
        CpuDelta {
            busy_seconds: busy as f64 / ticks_per_second(),
            utilisation: if total == 0 {
                0.0
            } else {
                busy as f64 / total as f64
            },
        }
    }
}

/// USER_HZ: the unit of /proc/stat (100 almost everywhere).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// CPU-seconds (user + system, every thread) spent so far by process `pid` and every process
/// descending from it (e.g. nginx's master and its workers), from fields 14 and 15 (`utime`,
/// `stime`, clock ticks) of `/proc/PID/stat`. A descendant that has exited is no longer counted
/// (its time moves to its parent's `cutime` only when reaped): call it while the tree is stable.
///
/// Errors: `pid` itself is gone or its stat unreadable.
pub fn process_tree_seconds(pid: u32) -> Result<f64> {
    let mut ticks = 0u64;
    for member in process_tree(pid)? {
        // A descendant may exit between the listing and this read; it then simply counts 0.
        match read_task_stat(&format!("/proc/{member}/stat")) {
            Ok(stat) => ticks += stat.utime + stat.stime,
            Err(err) if member == pid => return Err(err),
            Err(_) => {}
        }
    }
    Ok(ticks as f64 / ticks_per_second())
}

/// CPU-seconds (user + system) spent so far by the threads of this process whose name starts
/// with `prefix` (names as `/proc/self/task/TID/comm` has them: at most 15 bytes).
pub fn own_threads_seconds(prefix: &str) -> Result<f64> {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let path = entry?.path().join("stat");
        // A thread that ended since the listing has nothing left to count.
        if let Ok(stat) = read_task_stat(&path.to_string_lossy())
            && stat.comm.starts_with(prefix)
        {
            ticks += stat.utime + stat.stime;
        }
    }
    Ok(ticks as f64 / ticks_per_second())
}

/// `pid` and every process descending from it (parents before children).
pub fn process_tree(pid: u32) -> Result<Vec<u32>> {
    // Parent of every process now, from one pass over /proc.
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = read_task_stat(&format!("/proc/{id}/stat")) {
            parents.push((id, stat.ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    // Breadth first; bounded by the number of processes (each joins at most once).
    while i < tree.len() && tree.len() <= parents.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|&&(id, ppid)| ppid == parent && !tree.contains(&id))
                .map(|&(id, _)| id)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    Ok(tree)
}

/// Restricts every thread of `pid` and of its descendants to `cpus` (threads they create later
/// inherit it). A benchmark gives each contender the same CPUs this way, whatever its own
/// thread settings.
///
/// Errors: a CPU number beyond `CPU_SETSIZE`, or sched_setaffinity(2) refusing a thread that
/// still exists.
pub fn pin_process_tree(pid: u32, cpus: &[usize]) -> Result<()> {
    let set = cpu_set(cpus)?;
    for process in process_tree(pid)? {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{process}/task")) else {
            continue; // exited since the listing
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: a valid set of the size passed.
            let rc = unsafe {
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::ESRCH) {
                    return Err(err).with_context(|| format!("pinning thread {tid} of {process}"));
                }
            }
        }
    }
    Ok(())
}

/// Restricts the calling thread (and the threads and processes it creates later) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    // gettid: the calling thread only, not the whole process.
    // SAFETY: no preconditions.
    let tid = unsafe { libc::gettid() };
    let set = cpu_set(cpus)?;
    // SAFETY: a valid set of the size passed.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

/// The CPUs this thread may run on (sched_getaffinity(2)), ascending.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid set of the size passed; 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: cpu is within the set's size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// `cpus` as the kernel's bit set.
fn cpu_set(cpus: &[usize]) -> Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            bail!("CPU {cpu} is beyond CPU_SETSIZE");
        }
        // SAFETY: cpu is within the set's size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    Ok(set)
}

/// The fields of a `/proc/.../stat` line this module uses.
struct TaskStat {
    comm: String,
    ppid: u32,
    /// Clock ticks.
    utime: u64,
    stime: u64,
}

fn read_task_stat(path: &str) -> Result<TaskStat> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    parse_task_stat(&text).with_context(|| format!("parsing {path}"))
}

/// `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so the fields after it
/// are counted from its last `)`. proc(5): ppid is field 4, utime 14, stime 15.
fn parse_task_stat(text: &str) -> Result<TaskStat> {
    let (open, close) = match (text.find('('), text.rfind(')')) {
        (Some(open), Some(close)) if open < close => (open, close),
        _ => bail!("no (comm) in {text:?}"),
    };
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state).
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .context("short stat line")?
            .parse()
            .context("bad stat field")
    };
    Ok(TaskStat {
        comm,
        ppid: u32::try_from(field(4)?).context("ppid")?,
        utime: field(14)?,
        stime: field(15)?,
    })
}

fn parse(stat: &str) -> Result<CpuTimes> {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        bail!("no aggregate cpu line in /proc/stat");
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().context("bad /proc/stat field"))
        .collect::<Result<_>>()?;
    if fields.len() < 8 {
        bail!("short cpu line in /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already
    // counted in user, so it is not added again.
    let [user, nice, system, idle, iowait, irq, softirq, steal] =
        <[u64; 8]>::try_from(&fields[..8]).expect("eight fields");
    let busy = user + nice + system + irq + softirq + steal;
    Ok(CpuTimes {
        busy,
        total: busy + idle + iowait,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_aggregate_line() {
        let stat = "cpu  10 1 5 100 2 3 4 0 0 0\ncpu0 5 0 2 50 1 1 2 0 0 0\n";
        let t = parse(stat).unwrap();
        assert_eq!(t.busy, 10 + 1 + 5 + 3 + 4);
        assert_eq!(t.total, t.busy + 100 + 2);
    }

    #[test]
    fn task_stat_fields_count_from_the_last_parenthesis() {
        let line =
            "4242 (nginx: a (b) c) S 7 4242 4242 0 -1 4194560 100 0 0 0 31 9 0 0 20 0 1 0 5 0 0";
        let stat = parse_task_stat(line).unwrap();
        assert_eq!(stat.comm, "nginx: a (b) c");
        assert_eq!(stat.ppid, 7);
        assert_eq!((stat.utime, stat.stime), (31, 9));
        assert!(parse_task_stat("12 comm S 1").is_err());
    }

    #[test]
    fn our_own_process_tree_has_cpu_time() {
        let me = std::process::id();
        assert_eq!(process_tree(me).unwrap()[0], me);
        // Burn a little CPU so the count cannot be zero at a 10 ms tick.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(process_tree_seconds(me).unwrap() > 0.0);
    }
}
