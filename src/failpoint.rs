//! Crash points for the crash harness (`tests/crash.rs`): with `IMAGELSH_CRASH_AT=NAME:N` set,
//! the process aborts (no destructors, no flushes: as abrupt as SIGKILL) the N-th time it passes
//! `crash_point(NAME)`. Unset, as in any deployment, a point costs one check of a static.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    remaining: AtomicU64,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

fn armed() -> &'static Option<Armed> {
    ARMED.get_or_init(|| {
        let spec = std::env::var("IMAGELSH_CRASH_AT").ok()?;
        let (name, count) = spec.split_once(':').unwrap_or((&spec, "1"));
        let remaining = count.parse::<u64>().ok().filter(|&n| n > 0)?;
        Some(Armed { name: name.to_string(), remaining: AtomicU64::new(remaining) })
    })
}

/// Aborts here if the crash harness armed this point and its count ran out.
pub fn crash_point(name: &str) {
    if let Some(armed) = armed()
        && armed.name == name
        && armed.remaining.fetch_sub(1, Ordering::Relaxed) == 1
    {
        eprintln!("imagelsh: crash point {name} reached: aborting");
        std::process::abort();
    }
}

/// A unit test's code to run at a named point, once.
#[cfg(test)]
struct TestHook {
    name: &'static str,
    run: Box<dyn FnMut()>,
}

#[cfg(test)]
thread_local! {
    static HOOKS: std::cell::RefCell<Vec<TestHook>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs what a unit test of this thread set for `name` (`set_test_hook`): the test opens a
/// window at a point of the code, deterministically. Nothing outside unit tests.
pub fn test_hook(name: &str) {
    #[cfg(test)]
    {
        let hook = HOOKS.with(|hooks| {
            let mut hooks = hooks.borrow_mut();
            hooks.iter().position(|hook| hook.name == name).map(|i| hooks.remove(i).run)
        });
        if let Some(mut hook) = hook {
            hook();
        }
    }
    #[cfg(not(test))]
    let _ = name;
}

/// Runs `hook` once, the next time this thread passes `test_hook(name)`.
#[cfg(test)]
pub fn set_test_hook(name: &'static str, hook: impl FnMut() + 'static) {
    HOOKS.with(|hooks| hooks.borrow_mut().push(TestHook { name, run: Box::new(hook) }));
}
