//! The kernel's own record of memory-cgroup OOM kills, read from `/dev/kmsg`.
//!
//! The engine learns of an OOM kill from containerd, and on cgroup v1 containerd's shim can lose it:
//! its OOM watcher drops an event whose cgroup was already deleted, which happens when the machine
//! is busy and the container's exit is handled first. The container's `OOMKilled` flag then never
//! turns true (seen on Docker 20.10 with containerd 1.6: one OOM-killed container in 30 under a
//! compile's load kept the flag false). The kernel logs every memory-cgroup OOM kill synchronously,
//! naming the cgroup that hit its limit and the victim's cgroup, and both carry the container's id.

use std::io;

/// Whether the kernel log holds an OOM kill inside the memory cgroup of container `id` (its full id,
/// as the engine gives it). `None` when the log cannot be read (not Linux, or no permission: reading
/// it needs root or `CAP_SYSLOG` where `kernel.dmesg_restrict` is set) or `id` is too short to be
/// matched safely. Reads the whole ring buffer, one record per call: meant for the rare SIGKILLed
/// step, not for every step. Blocking; call it off the async workers.
#[must_use]
pub fn oom_kill_logged(id: &str) -> Option<bool> {
    if id.len() < 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let flags =
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC;
    let fd = rustix::fs::open("/dev/kmsg", flags, rustix::fs::Mode::empty()).ok()?;
    // A record is at most about 1 KiB of text plus its continuation lines; a read into a buffer too
    // small for the next record fails with EINVAL.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match rustix::io::read(&fd, &mut buf) {
            Ok(0) => return Some(false),
            Ok(n) => {
                if record_names_oom_kill_of(&String::from_utf8_lossy(&buf[..n]), id) {
                    return Some(true);
                }
            }
            // The end of the log.
            Err(rustix::io::Errno::AGAIN) => return Some(false),
            // Records were overwritten while reading: the next read goes on from the oldest kept.
            Err(rustix::io::Errno::PIPE | rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::debug!(error = %io::Error::from(e), "reading /dev/kmsg");
                return None;
            }
        }
    }
}

/// Whether one `/dev/kmsg` record (`prio,seq,usec,flags;message`, then continuation lines) reports an
/// OOM kill that involves container `id`'s cgroup: the kernel's `oom-kill:` summary (Linux 4.19 and
/// later) with `oom_memcg=` or `task_memcg=` naming it, or the older `Task in ... killed as a result of
/// limit of ...` line. Cgroup paths carry the id as `/docker/<id>` (cgroupfs driver) or
/// `docker-<id>.scope` (systemd driver).
fn record_names_oom_kill_of(record: &str, id: &str) -> bool {
    let Some((_, message)) = record.split_once(';') else {
        return false;
    };
    let message = message.lines().next().unwrap_or_default();
    let in_cgroup = |path: &str| path.split('/').any(|part| part.contains(id));
    if let Some(fields) = message.strip_prefix("oom-kill:") {
        return fields.split(',').any(|field| {
            field
                .strip_prefix("oom_memcg=")
                .or_else(|| field.strip_prefix("task_memcg="))
                .is_some_and(in_cgroup)
        });
    }
    if let Some(rest) = message.strip_prefix("Task in ") {
        if let Some((task, limit)) = rest.split_once(" killed as a result of limit of ") {
            return in_cgroup(task) || in_cgroup(limit.trim());
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "874c21303279eab58f849882cda40608650a516abdd208f9c545301a10497d75";
    const OTHER: &str = "f8474e4a409c69eba51c547fbf0e2c16e17ccbd5eb7203ed16b406966968aa83";

    fn summary(memcg: &str) -> String {
        format!(
            "6,5422,649538769,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={ID},\
             mems_allowed=0,oom_memcg={memcg},task_memcg={memcg},task=dd,pid=12751,uid=0\n"
        )
    }

    #[test]
    fn the_kernels_summary_names_the_container_by_its_cgroup() {
        assert!(record_names_oom_kill_of(
            &summary(&format!("/docker/{ID}")),
            ID
        ));
        let scope = format!("/system.slice/docker-{ID}.scope");
        assert!(record_names_oom_kill_of(&summary(&scope), ID));
        // Another container's kill, even with this id in an unrelated field (the cpuset here).
        assert!(!record_names_oom_kill_of(
            &summary(&format!("/docker/{OTHER}")),
            ID
        ));
    }

    #[test]
    fn a_limit_on_a_parent_cgroup_counts_when_the_victim_is_in_the_container() {
        let record = format!(
            "6,7,8,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=x,mems_allowed=0,\
             oom_memcg=/ci,task_memcg=/ci/docker-{ID}.scope,task=dd,pid=1,uid=0\n"
        );
        assert!(record_names_oom_kill_of(&record, ID));
    }

    #[test]
    fn older_kernels_task_in_line_is_understood() {
        let record =
            format!("6,1,2,-;Task in /docker/{ID} killed as a result of limit of /docker/{ID}\n");
        assert!(record_names_oom_kill_of(&record, ID));
        let other = format!(
            "6,1,2,-;Task in /docker/{OTHER} killed as a result of limit of /docker/{OTHER}\n"
        );
        assert!(!record_names_oom_kill_of(&other, ID));
    }

    #[test]
    fn records_that_are_not_oom_kills_do_not_count() {
        let record = format!("6,1,2,-;docker0: port 1(veth{ID}) entered disabled state\n");
        assert!(!record_names_oom_kill_of(&record, ID));
        assert!(!record_names_oom_kill_of(&format!("no separator {ID}"), ID));
        // A continuation line holding the id does not make another record an OOM kill.
        let record = format!("6,1,2,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/docker/{OTHER}\n SUBSYSTEM=/docker/{ID}\n");
        assert!(!record_names_oom_kill_of(&record, ID));
    }

    #[test]
    fn short_or_non_hex_ids_are_not_looked_up() {
        assert_eq!(oom_kill_logged("874c2130"), None);
        assert_eq!(
            oom_kill_logged("drover-step-name-that-is-long-enough-x"),
            None
        );
    }
}
