//! What a SIGTERM from systemd is part of. `systemctl restart` (and
//! `try-restart`, `reload-or-restart`) queues a `restart` job for the
//! unit and stops its processes first; while they stop, the job is listed
//! by `systemctl list-jobs`. When the unit's file descriptor store holds
//! every socket this process serves, the next process serves from the
//! very same sockets, so this one need not drain the node: see
//! `crate::stop`.

use std::time::Duration;

use tokio::time::Instant;

/// How long the questions to systemd may take, together.
pub(crate) const CHECK_WAIT: Duration = Duration::from_secs(2);

/// What systemd does to this process's unit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stopping {
    /// A restart, and the store holds the sockets this process serves.
    Restart { unit: String, stored: usize },
    /// Anything else, and why it is not the above.
    Stop { why: String },
}

/// What systemd does to this process's unit, for a process that serves
/// `served` distinct sockets (all sent to the store). Asked within
/// [`CHECK_WAIT`]; whatever cannot be found out is a stop.
pub(crate) async fn stopping(served: usize) -> Stopping {
    let Some(unit) = own_unit() else {
        return Stopping::Stop {
            why: "this process does not run in a systemd service unit".to_string(),
        };
    };
    let deadline = Instant::now() + CHECK_WAIT;
    let list = ["list-jobs", "--no-legend", "--plain", "--no-pager", &unit];
    let jobs = match systemctl(&list, deadline).await {
        Ok(out) => out,
        Err(why) => return Stopping::Stop { why },
    };
    if !restart_job(&jobs, &unit) {
        return Stopping::Stop {
            why: format!("systemd has no restart job for {unit}"),
        };
    }
    let show = ["show", "--property=NFileDescriptorStore", "--value", &unit];
    let stored = match systemctl(&show, deadline)
        .await
        .map(|out| store_count(&out))
    {
        Ok(Some(stored)) => stored,
        Ok(None) => {
            return Stopping::Stop {
                why: format!("systemd does not say how many sockets it keeps for {unit}"),
            };
        }
        Err(why) => return Stopping::Stop { why },
    };
    if stored < served {
        return Stopping::Stop {
            why: format!(
                "the file descriptor store of {unit} holds {stored} descriptors, this process serves {served} sockets (FileDescriptorStoreMax= in the unit)"
            ),
        };
    }
    Stopping::Restart { unit, stored }
}

/// The standard output of `systemctl <args>`, by `deadline`.
async fn systemctl(args: &[&str], deadline: Instant) -> Result<String, String> {
    let run = tokio::process::Command::new("systemctl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout_at(deadline, run).await {
        Err(_) => Err(format!(
            "systemctl {} did not answer within {CHECK_WAIT:?}",
            args[0]
        )),
        Ok(Err(error)) => Err(format!("cannot run systemctl: {error}")),
        Ok(Ok(out)) if !out.status.success() => Err(format!(
            "systemctl {} failed ({}): {}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Ok(out)) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
    }
}

/// Whether `systemctl list-jobs --no-legend --plain` lists a restart job
/// for `unit` (its lines are `JOB UNIT TYPE STATE`).
pub(crate) fn restart_job(list: &str, unit: &str) -> bool {
    list.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(
            fields.as_slice(),
            [job, u, "restart" | "try-restart", _state]
                if *u == unit && job.parse::<u32>().is_ok()
        )
    })
}

/// The count `systemctl show --property=NFileDescriptorStore --value`
/// prints.
pub(crate) fn store_count(show: &str) -> Option<usize> {
    show.trim().parse().ok()
}

/// The systemd service unit this process runs in (`/proc/self/cgroup`).
pub(crate) fn own_unit() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_of_cgroup(&cgroup)
}

/// The service unit a `/proc/<pid>/cgroup` text places its process in
/// (cgroup v2's `0::` line, or v1's `name=systemd` hierarchy).
pub(crate) fn unit_of_cgroup(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            (controllers.is_empty() || controllers == "name=systemd").then_some(path)
        })
        .find_map(|path| {
            path.rsplit('/')
                .find(|part| part.ends_with(".service"))
                .map(str::to_string)
        })
}

/// Tests of what systemd's answers are read as.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_unit_is_read_from_cgroup_v2_and_v1() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/payments.service\n").as_deref(),
            Some("payments.service")
        );
        // A unit's sub-cgroup (Delegate=yes).
        assert_eq!(
            unit_of_cgroup("0::/system.slice/shop@2.service/worker\n").as_deref(),
            Some("shop@2.service")
        );
        let v1 = "12:cpu,cpuacct:/system.slice/other.service\n1:name=systemd:/system.slice/web.service\n";
        assert_eq!(unit_of_cgroup(v1).as_deref(), Some("web.service"));
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(unit_of_cgroup("0::/\n"), None);
    }

    #[test]
    fn a_restart_job_is_one_for_this_unit() {
        let unit = "signpost.service";
        assert!(restart_job("1234 signpost.service restart running\n", unit));
        assert!(restart_job(
            "77   network.target   start   waiting\n1234 signpost.service try-restart running\n",
            unit
        ));
        // A stop, another unit's restart, nothing, or noise.
        assert!(!restart_job("1234 signpost.service stop running\n", unit));
        assert!(!restart_job(
            "1234 signpost-cp.service restart running\n",
            unit
        ));
        assert!(!restart_job("", unit));
        assert!(!restart_job("No jobs running.\n", unit));
        assert!(!restart_job("JOB UNIT TYPE STATE\n", unit));
        assert!(!restart_job("x signpost.service restart running\n", unit));
    }

    #[test]
    fn the_store_count_is_a_number() {
        assert_eq!(store_count("42\n"), Some(42));
        assert_eq!(store_count("0"), Some(0));
        assert_eq!(store_count(""), None);
        assert_eq!(store_count("NFileDescriptorStore=3\n"), None);
    }
}
