//! Reads a process's figures from Linux's `/proc/PID`: resident memory,
//! CPU time and open descriptors. Every `/proc` read of the load generator
//! is here. It owns no sampling schedule and no judgement (the probe in
//! `lib.rs` and the `soak` scenario decide when to read and what the
//! figures mean); a figure that cannot be read is `None`, never a panic.

/// Clock ticks per second in `/proc/PID/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The process's resident memory in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process's CPU time (user + system) in seconds, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// How many descriptors the process holds open, from `/proc/PID/fd`.
pub fn open_fds(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.count() as u64)
}

/// Where the figures of `pid` are read, as shown in a report.
pub fn describe(pid: u32) -> String {
    format!("/proc/{pid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_rss_cpu_and_descriptors() {
        let me = std::process::id();
        assert!(rss_bytes(me).is_some_and(|b| b > 0));
        assert!(cpu_seconds(me).is_some());
        assert!(open_fds(me).is_some_and(|n| n > 0));
    }

    #[test]
    fn a_process_that_is_not_there_has_no_figures() {
        // PIDs are below 2^22 on Linux: this one cannot exist.
        let gone = u32::MAX;
        assert_eq!(rss_bytes(gone), None);
        assert_eq!(cpu_seconds(gone), None);
        assert_eq!(open_fds(gone), None);
    }
}
