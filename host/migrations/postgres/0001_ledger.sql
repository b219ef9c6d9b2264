-- The credits ledger (docs/payments.md), as host/src/ledger/postgres.rs keeps
-- it. Amounts are micro-credits: numeric(20,0) holds every u64 exactly.
-- JSON columns keep the host's own serialization (text, not jsonb, so a
-- stored receipt is byte for byte what the host wrote).

-- One row: the ledger's id (in every meter event's id) and the next journal
-- sequence number. Every write transaction locks this row first
-- (SELECT ... FOR UPDATE), so writes from every host apply one after
-- another: a tenant's available credits are read and spent under that lock,
-- and sequence numbers are gap-free and committed in order.
CREATE TABLE ledger_meta (
    id integer PRIMARY KEY CHECK (id = 1),
    ledger_id text NOT NULL,
    next_seq bigint NOT NULL CHECK (next_seq >= 1)
);

CREATE TABLE ledger_accounts (
    account text PRIMARY KEY,
    debits_posted numeric(20, 0) NOT NULL CHECK (debits_posted >= 0),
    credits_posted numeric(20, 0) NOT NULL CHECK (credits_posted >= 0),
    debits_pending numeric(20, 0) NOT NULL CHECK (debits_pending >= 0),
    credits_pending numeric(20, 0) NOT NULL CHECK (credits_pending >= 0),
    overrun numeric(20, 0) NOT NULL CHECK (overrun >= 0)
);

-- One hold per sandbox attempt; `record` is the HoldRecord JSON, `state` and
-- `expires_at_ms` repeat it for the expiry scan.
CREATE TABLE ledger_holds (
    sandbox_id text PRIMARY KEY,
    state text NOT NULL,
    expires_at_ms bigint NOT NULL,
    record text NOT NULL
);
CREATE INDEX ledger_holds_open_by_expiry ON ledger_holds (expires_at_ms)
    WHERE state = 'open';

-- Append-only.
CREATE TABLE ledger_journal (
    seq bigint PRIMARY KEY,
    tenant text NOT NULL,
    entry text NOT NULL
);
CREATE INDEX ledger_journal_by_tenant ON ledger_journal (tenant, seq);

-- The meter event of the journal entry with the same seq.
CREATE TABLE ledger_outbox (
    seq bigint PRIMARY KEY,
    event text NOT NULL
);

-- Idempotency key -> the operation and its first receipt (JSON).
CREATE TABLE ledger_keys (
    key text PRIMARY KEY,
    stored text NOT NULL
);
