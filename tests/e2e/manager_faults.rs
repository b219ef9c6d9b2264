//! The manager through the library, with a ledger that fails on cue: what a
//! failure between the extension's calls and the ledger leaves behind.

use crate::support::*;
use sandboxer_host::ledger::*;
use sandboxer_host::manager::{CreateRequest, ManagerError, SandboxManager, SandboxState};
use sandboxer_host::profile::Profile;
use sandboxer_host::runtime::ExtensionCatalog;
use sandboxer_host::state_db::StateDb;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The home's redb ledger, except that the next settle fails (as a full
/// disk would fail it) while `fail_settle` is set, or is applied and then
/// answered with an error (a lost answer) while `lose_settle_answer` is.
struct FlakyLedger {
    inner: Ledger,
    fail_settle: AtomicBool,
    lose_settle_answer: AtomicBool,
}

impl LedgerStore for FlakyLedger {
    fn location(&self) -> String {
        LedgerStore::location(&self.inner)
    }
    fn submit(&self, operation: Operation) -> LedgerFuture<'_, Receipt> {
        if matches!(operation, Operation::Settle { .. })
            && self.fail_settle.swap(false, Ordering::SeqCst)
        {
            return Box::pin(async {
                Err(LedgerError::Storage(
                    "No space left on device (os error 28)".into(),
                ))
            });
        }
        if matches!(operation, Operation::Settle { .. })
            && self.lose_settle_answer.swap(false, Ordering::SeqCst)
        {
            let applied = LedgerStore::submit(&self.inner, operation);
            return Box::pin(async move {
                applied.await?;
                Err(LedgerError::Storage("the connection was reset".into()))
            });
        }
        LedgerStore::submit(&self.inner, operation)
    }
    fn summary<'a>(&'a self, tenant: &'a str) -> LedgerFuture<'a, TenantSummary> {
        LedgerStore::summary(&self.inner, tenant)
    }
    fn knows_tenant<'a>(&'a self, tenant: &'a str) -> LedgerFuture<'a, bool> {
        LedgerStore::knows_tenant(&self.inner, tenant)
    }
    fn tenant_names(&self) -> LedgerFuture<'_, Vec<String>> {
        LedgerStore::tenant_names(&self.inner)
    }
    fn account_totals<'a>(&'a self, account: &'a str) -> LedgerFuture<'a, AccountTotals> {
        LedgerStore::account_totals(&self.inner, account)
    }
    fn revenue_total(&self) -> LedgerFuture<'_, u64> {
        LedgerStore::revenue_total(&self.inner)
    }
    fn outbox_last_seq(&self) -> LedgerFuture<'_, u64> {
        LedgerStore::outbox_last_seq(&self.inner)
    }
    fn history<'a>(&'a self, tenant: &'a str, limit: usize) -> LedgerFuture<'a, Vec<JournalEntry>> {
        LedgerStore::history(&self.inner, tenant, limit)
    }
    fn journal_entries(&self, after_seq: u64, limit: usize) -> LedgerFuture<'_, Vec<JournalEntry>> {
        LedgerStore::journal_entries(&self.inner, after_seq, limit)
    }
    fn outbox_after(&self, after_seq: u64, limit: usize) -> LedgerFuture<'_, Vec<(u64, String)>> {
        LedgerStore::outbox_after(&self.inner, after_seq, limit)
    }
    fn hold_record<'a>(&'a self, sandbox_id: &'a str) -> LedgerFuture<'a, Option<HoldRecord>> {
        LedgerStore::hold_record(&self.inner, sandbox_id)
    }
    fn settle_receipt<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> LedgerFuture<'a, Option<SettleReceipt>> {
        LedgerStore::settle_receipt(&self.inner, sandbox_id)
    }
    fn open_holds(&self) -> LedgerFuture<'_, Vec<HoldRecord>> {
        LedgerStore::open_holds(&self.inner)
    }
    fn noted_holds(&self) -> LedgerFuture<'_, Vec<HoldRecord>> {
        LedgerStore::noted_holds(&self.inner)
    }
    fn any_hold_due(&self, now_ms: u64) -> LedgerFuture<'_, bool> {
        LedgerStore::any_hold_due(&self.inner, now_ms)
    }
    fn verify(&self) -> LedgerFuture<'_, VerifyReport> {
        LedgerStore::verify(&self.inner)
    }
}

/// A home with `note-in-kv`, 10 credits for `t1`, and one of its sandboxes
/// created through a manager on a [`FlakyLedger`].
async fn home_with_a_sandbox() -> (
    TestHome,
    Arc<FlakyLedger>,
    SandboxManager,
    sandboxer_host::manager::SandboxStatus,
) {
    let home = TestHome::new();
    install(
        &built_fixtures(),
        "note-in-kv",
        &home.extensions(),
        "note-in-kv",
    );
    let state = Arc::new(StateDb::new(home.path().join("state.redb")));
    let runtime =
        sandboxer_host::runtime::Runtime::new(home.path().join("cache"), state.clone()).unwrap();
    let extensions = runtime.load_dir(&home.extensions()).await.unwrap();
    let ledger = Ledger::open(
        &home.ledger_file(),
        LedgerOptions {
            default_credits: 0,
            expire_on_open: false,
        },
    )
    .unwrap();
    ledger.grant("t1", 10_000_000, Some("start")).unwrap();
    let flaky = Arc::new(FlakyLedger {
        inner: ledger,
        fail_settle: AtomicBool::new(false),
        lose_settle_answer: AtomicBool::new(false),
    });
    let manager = SandboxManager::new(
        flaky.clone(),
        state,
        Arc::new(ExtensionCatalog::new(extensions)),
    );
    let profile = Profile::parse(
        "[route]\nstrategy = \"explicit\"\nextension = \"note-in-kv\"\n",
        Path::new("noted.toml"),
    )
    .unwrap();
    let request = CreateRequest {
        profile,
        tenant: "t1".into(),
        ttl_secs: None,
        command: None,
        metadata: Default::default(),
    };
    let created = manager.create(&request).await.unwrap();
    (home, flaky, manager, created)
}

/// A settle that fails after the extension destroyed the sandbox and priced
/// it keeps what was measured: the record stays `destroying` with the
/// usage, the hold stays open, and the retry charges that usage without
/// destroying again (`note-in-kv` prices 500 micro-credits a destroy).
#[tokio::test]
async fn a_failed_settle_keeps_the_usage_and_the_retry_charges_it_once() {
    let (_home, flaky, manager, created) = home_with_a_sandbox().await;

    flaky.fail_settle.store(true, Ordering::SeqCst);
    let failed = manager.destroy(&created.id, false).await.unwrap_err();
    assert!(
        matches!(&failed, ManagerError::Ledger(LedgerError::Storage(message)) if message.contains("No space left")),
        "{failed}"
    );
    let kept = manager.get(&created.id).unwrap();
    assert_eq!(kept.state, SandboxState::Destroying);
    assert_eq!(
        kept.meter.reported_usage.map(|usage| usage.wall_ms),
        Some(1_000),
        "the usage destroy reported is kept for the retry"
    );
    let summary = flaky.summary("t1").await.unwrap();
    assert_eq!(summary.held, 1_000, "the hold stays open");

    let destroyed = manager.destroy(&created.id, false).await.unwrap();
    assert_eq!(destroyed.state, SandboxState::Destroyed);
    assert_eq!(
        destroyed.meter.actual,
        Some(500),
        "charged for one destroy: the retry priced the kept usage and note"
    );
    let summary = flaky.summary("t1").await.unwrap();
    assert_eq!((summary.held, summary.balance), (0, 10_000_000 - 500));
    assert!(
        flaky.verify().await.unwrap().ok,
        "the ledger's invariants hold"
    );
}

/// A settle the ledger applied but whose answer was lost: the usage is
/// kept, and the retry finds the charge made, without destroying again
/// (one destroy, 500 micro-credits, charged once).
#[tokio::test]
async fn a_settle_whose_answer_was_lost_is_charged_once() {
    let (_home, flaky, manager, created) = home_with_a_sandbox().await;
    flaky.lose_settle_answer.store(true, Ordering::SeqCst);
    let failed = manager.destroy(&created.id, false).await.unwrap_err();
    assert!(
        failed.to_string().contains("the connection was reset"),
        "{failed}"
    );
    let kept = manager.get(&created.id).unwrap();
    assert_eq!(kept.state, SandboxState::Destroying);
    assert!(kept.meter.reported_usage.is_some(), "the usage is kept");

    let destroyed = manager.destroy(&created.id, false).await.unwrap();
    assert_eq!(destroyed.state, SandboxState::Destroyed);
    assert_eq!(destroyed.meter.actual, Some(500), "one destroy priced");
    let history = flaky.history("t1", 100).await.unwrap();
    let charges = history
        .iter()
        .filter(|entry| entry.kind == EntryKind::Charge)
        .count();
    assert_eq!(charges, 1, "charged once: {history:?}");
    let summary = flaky.summary("t1").await.unwrap();
    assert_eq!((summary.held, summary.balance), (0, 10_000_000 - 500));
    assert!(flaky.verify().await.unwrap().ok);
}
