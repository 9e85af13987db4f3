//! The instance state machine: which actions each state allows, and what a
//! VMM exit means. Pure, so the rules are tested as a table.

use vroom_types::{DesiredState, InstanceAction, InstanceState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionPlan {
    /// Carry the action out.
    Proceed,
    /// Already in the requested state; nothing to do.
    Noop,
    /// Not allowed now, with the reason.
    Refuse(&'static str),
}

pub fn plan_action(state: InstanceState, action: InstanceAction) -> ActionPlan {
    use ActionPlan::*;
    use InstanceState as S;
    match (action, state) {
        (_, S::Stopping) => Refuse("the instance is stopping"),
        (InstanceAction::Start, S::Running | S::Starting) => Noop,
        (InstanceAction::Start, S::Stopped | S::Failed | S::Restarting) => Proceed,
        (InstanceAction::Stop, S::Stopped) => Noop,
        (InstanceAction::Stop, S::Running | S::Starting | S::Restarting | S::Failed) => Proceed,
        (InstanceAction::Restart, _) => Proceed,
    }
}

/// What to do when a VMM process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitOutcome {
    /// The user stopped it (or is stopping it).
    Stopped,
    /// It died on its own while wanted: restart with backoff.
    Restart,
    /// It was killed because it failed; leave it failed.
    Failed,
    /// It died while booting and has never been ready: a broken image or
    /// config, which restarting would only repeat. Fail it with its console.
    BootFailed,
}

/// `ever_ready`: the guest has reported ready at least once since the
/// instance was created, so a death during a later boot is worth a restart.
pub fn on_exit(state: InstanceState, desired: DesiredState, ever_ready: bool) -> ExitOutcome {
    match (state, desired) {
        (InstanceState::Failed, _) => ExitOutcome::Failed,
        (_, DesiredState::Stopped) | (InstanceState::Stopping, _) => ExitOutcome::Stopped,
        (InstanceState::Starting, DesiredState::Running) if !ever_ready => ExitOutcome::BootFailed,
        (_, DesiredState::Running) => ExitOutcome::Restart,
    }
}

/// Backoff before restart number `streak` (1-based): 1 s, 2 s, 4 s … capped at 30 s.
pub fn restart_backoff_secs(streak: u32) -> u64 {
    (1u64 << streak.saturating_sub(1).min(5)).min(30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ActionPlan::*;
    use InstanceAction as A;
    use InstanceState as S;

    #[test]
    fn action_table() {
        let cases = [
            (S::Stopped, A::Start, Proceed),
            (S::Failed, A::Start, Proceed),
            (S::Restarting, A::Start, Proceed),
            (S::Running, A::Start, Noop),
            (S::Starting, A::Start, Noop),
            (S::Stopping, A::Start, Refuse("the instance is stopping")),
            (S::Running, A::Stop, Proceed),
            (S::Starting, A::Stop, Proceed),
            (S::Restarting, A::Stop, Proceed),
            (S::Failed, A::Stop, Proceed),
            (S::Stopped, A::Stop, Noop),
            (S::Stopping, A::Stop, Refuse("the instance is stopping")),
            (S::Running, A::Restart, Proceed),
            (S::Stopped, A::Restart, Proceed),
        ];
        for (state, action, want) in cases {
            assert_eq!(plan_action(state, action), want, "{state:?} {action:?}");
        }
    }

    #[test]
    fn exit_table() {
        use DesiredState::*;
        let cases = [
            (S::Running, Running, true, ExitOutcome::Restart),
            (S::Starting, Running, true, ExitOutcome::Restart),
            (S::Starting, Running, false, ExitOutcome::BootFailed),
            (S::Restarting, Running, false, ExitOutcome::Restart),
            (S::Running, Stopped, true, ExitOutcome::Stopped),
            (S::Starting, Stopped, false, ExitOutcome::Stopped),
            (S::Stopping, Running, true, ExitOutcome::Stopped),
            (S::Failed, Running, true, ExitOutcome::Failed),
            (S::Failed, Stopped, false, ExitOutcome::Failed),
        ];
        for (state, desired, ever_ready, want) in cases {
            assert_eq!(
                on_exit(state, desired, ever_ready),
                want,
                "{state:?} {desired:?} ever_ready={ever_ready}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let got: Vec<u64> = (1..=8).map(restart_backoff_secs).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
