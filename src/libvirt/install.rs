//! `prescient install-libvirt-hook`: writes `/etc/libvirt/hooks/qemu` as a
//! small shell wrapper that runs `prescient libvirt-hook` with the daemon's
//! socket and the hook's time bound. Idempotent; a hook that Prescient did
//! not write is replaced only with `force` (and kept next to it).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::LibvirtError;

/// The line that marks a hook written by Prescient.
pub const MARKER: &str = "# prescient-libvirt-hook: written by `prescient install-libvirt-hook`";

/// What to install.
#[derive(Clone, Debug)]
pub struct InstallConfig {
    /// libvirt's hooks directory (`/etc/libvirt/hooks`).
    pub hooks_dir: PathBuf,
    /// The `prescient` binary the hook runs.
    pub binary: PathBuf,
    /// The daemon's hooks socket.
    pub socket: PathBuf,
    /// The hook's time bound.
    pub timeout: Duration,
    /// Replace a hook that Prescient did not write.
    pub force: bool,
}

/// What installing did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    /// There was no hook; ours is there now.
    Created(PathBuf),
    /// Ours was there already, the same.
    Unchanged(PathBuf),
    /// Ours was there with other settings; updated.
    Updated(PathBuf),
    /// A hook Prescient did not write was replaced (with `force`); it was
    /// moved to the second path.
    Replaced(PathBuf, PathBuf),
}

impl std::fmt::Display for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const RELOAD: &str = "libvirtd looks for hooks when it starts: restart it (or start it) so that it runs this one";
        match self {
            Installed::Created(p) => {
                write!(f, "installed the libvirt hook {}; {RELOAD}", p.display())
            }
            Installed::Unchanged(p) => write!(
                f,
                "the libvirt hook {} is installed already, unchanged",
                p.display()
            ),
            Installed::Updated(p) => write!(f, "updated the libvirt hook {}", p.display()),
            Installed::Replaced(p, old) => write!(
                f,
                "replaced the libvirt hook {} (the previous one is now {}); {RELOAD}",
                p.display(),
                old.display()
            ),
        }
    }
}

/// The wrapper script. It exits 0 when the binary is gone, so that an
/// uninstalled Prescient never stops a domain from starting.
pub fn hook_script(
    binary: &Path,
    socket: &Path,
    timeout: Duration,
) -> Result<String, LibvirtError> {
    let b = shell_quote(binary)?;
    let s = shell_quote(socket)?;
    let ms = timeout.as_millis();
    Ok(format!(
        "#!/bin/sh\n\
         {MARKER}\n\
         # libvirt runs this as hooks/qemu DOMAIN OPERATION SUB-OPERATION EXTRA with the\n\
         # domain XML on stdin; it forwards the call to the Prescient daemon and\n\
         # returns within {ms} ms, exit status 0, whatever the daemon does.\n\
         [ -x {b} ] || exit 0\n\
         exec {b} libvirt-hook --socket {s} --timeout-ms {ms} -- \"$@\"\n"
    ))
}

fn shell_quote(p: &Path) -> Result<String, LibvirtError> {
    let s = p.to_str().ok_or_else(|| LibvirtError::Install {
        path: p.to_path_buf(),
        why: "the path is not UTF-8".into(),
    })?;
    if !p.is_absolute() || s.contains('\n') {
        return Err(LibvirtError::Install {
            path: p.to_path_buf(),
            why: "the hook needs an absolute path on one line".into(),
        });
    }
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

/// What to do with the hook file, given what is there (pure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Write it; nothing is there.
    Create,
    /// Leave it; ours, identical.
    Keep,
    /// Rewrite it; ours, different.
    Update,
    /// Move the foreign hook aside and write ours.
    Replace,
    /// Refuse: a foreign hook, no force.
    Refuse,
}

/// Decides from the current content (`None`: no file).
pub fn plan(existing: Option<&[u8]>, wanted: &str, force: bool) -> Plan {
    match existing {
        None => Plan::Create,
        Some(e) if e == wanted.as_bytes() => Plan::Keep,
        Some(e) if String::from_utf8_lossy(e).lines().any(|l| l == MARKER) => Plan::Update,
        Some(_) if force => Plan::Replace,
        Some(_) => Plan::Refuse,
    }
}

/// Installs the hook as `hooks_dir/qemu`.
pub fn install(config: &InstallConfig) -> Result<Installed, LibvirtError> {
    let err = |path: &Path, why: String| LibvirtError::Install {
        path: path.to_path_buf(),
        why,
    };
    let binary = std::fs::canonicalize(&config.binary).map_err(|e| {
        err(
            &config.binary,
            format!("cannot find the prescient binary: {e}"),
        )
    })?;
    let script = hook_script(&binary, &config.socket, config.timeout)?;
    let target = config.hooks_dir.join("qemu");
    let existing = match std::fs::read(&target) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(&target, format!("cannot read it: {e}"))),
    };
    let mode_ok = std::fs::metadata(&target)
        .map(|m| m.permissions().mode() & 0o777 == 0o755)
        .unwrap_or(false);
    let p = plan(existing.as_deref(), &script, config.force);
    let backup = target.with_file_name(format!(
        "qemu.before-prescient.{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    ));
    match p {
        Plan::Refuse => {
            return Err(err(
                &target,
                "a hook that Prescient did not write is installed there; \
                 pass --force to replace it (it is kept as qemu.before-prescient.TIME), \
                 or call prescient libvirt-hook from it"
                    .into(),
            ));
        }
        Plan::Keep if mode_ok => return Ok(Installed::Unchanged(target)),
        Plan::Replace => {
            std::fs::rename(&target, &backup)
                .map_err(|e| err(&target, format!("cannot move the old hook aside: {e}")))?;
        }
        Plan::Keep | Plan::Create | Plan::Update => {}
    }
    std::fs::create_dir_all(&config.hooks_dir).map_err(|e| {
        err(
            &config.hooks_dir,
            format!("cannot create the directory: {e}"),
        )
    })?;
    // Write beside it and rename, so that libvirt never runs half a script.
    let tmp = config.hooks_dir.join(".qemu.prescient-tmp");
    std::fs::write(&tmp, &script).map_err(|e| err(&tmp, format!("cannot write: {e}")))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| err(&tmp, format!("cannot set mode 0755: {e}")))?;
    std::fs::rename(&tmp, &target)
        .map_err(|e| err(&target, format!("cannot put in place: {e}")))?;
    Ok(match p {
        Plan::Create => Installed::Created(target),
        Plan::Replace => Installed::Replaced(target, backup),
        Plan::Keep | Plan::Update | Plan::Refuse => Installed::Updated(target),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, force: bool) -> InstallConfig {
        InstallConfig {
            hooks_dir: dir.join("hooks"),
            binary: std::env::current_exe().unwrap(),
            socket: PathBuf::from("/run/prescient/hooks.sock"),
            timeout: Duration::from_secs(2),
            force,
        }
    }

    #[test]
    fn plan_covers_every_case() {
        let w = format!("#!/bin/sh\n{MARKER}\nexec x\n");
        assert_eq!(plan(None, &w, false), Plan::Create);
        assert_eq!(plan(Some(w.as_bytes()), &w, false), Plan::Keep);
        let older = format!("#!/bin/sh\n{MARKER}\nexec y\n");
        assert_eq!(plan(Some(older.as_bytes()), &w, false), Plan::Update);
        assert_eq!(
            plan(Some(b"#!/bin/sh\nlogger hi\n"), &w, false),
            Plan::Refuse
        );
        assert_eq!(
            plan(Some(b"#!/bin/sh\nlogger hi\n"), &w, true),
            Plan::Replace
        );
    }

    #[test]
    fn script_quotes_paths_and_exits_zero_without_binary() {
        let s = hook_script(
            Path::new("/opt/it's/prescient"),
            Path::new("/run/p.sock"),
            Duration::from_millis(1500),
        )
        .unwrap();
        assert!(s.contains(r"'/opt/it'\''s/prescient'"), "{s}");
        assert!(s.contains("--timeout-ms 1500"));
        assert!(s.contains("|| exit 0"));
        assert!(
            hook_script(
                Path::new("relative"),
                Path::new("/s"),
                Duration::from_secs(1)
            )
            .is_err()
        );
        assert!(hook_script(Path::new("/a\nb"), Path::new("/s"), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn install_is_idempotent_and_keeps_foreign_hooks() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), false);
        let r = install(&c).unwrap();
        assert!(matches!(r, Installed::Created(_)), "{r:?}");
        let target = dir.path().join("hooks/qemu");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        assert!(matches!(install(&c).unwrap(), Installed::Unchanged(_)));
        let mut c2 = c.clone();
        c2.timeout = Duration::from_secs(3);
        assert!(matches!(install(&c2).unwrap(), Installed::Updated(_)));

        std::fs::write(&target, "#!/bin/sh\nlogger theirs\n").unwrap();
        let e = install(&c).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "#!/bin/sh\nlogger theirs\n"
        );
        let mut forced = c.clone();
        forced.force = true;
        let Installed::Replaced(_, old) = install(&forced).unwrap() else {
            panic!("not replaced");
        };
        assert_eq!(
            std::fs::read_to_string(old).unwrap(),
            "#!/bin/sh\nlogger theirs\n"
        );
        assert!(std::fs::read_to_string(&target).unwrap().contains(MARKER));
    }
}
