//! Whole-machine CPU time from `/proc/stat` (not namespaced: it covers the load generator, the
//! balancer, the backends and the kernel's softirq work for all of them alike).

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
}
