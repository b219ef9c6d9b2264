-- The shared part of the hosts' state (docs/deployment.md), as
-- host/src/state_pg.rs keeps it: sandbox records with the host that owns
-- each, its lease, the lifecycle events, and the extensions' key-value
-- stores, tenants and keys. JSON columns keep the host's own serialization
-- (text).

-- One row: the store's id (in every lifecycle event's id) and the next
-- lifecycle event's sequence number. A transaction that appends events locks
-- this row first, so sequence numbers are gap-free and committed in order:
-- a reader that has seen seq n has seen everything before it.
CREATE TABLE state_meta (
    id integer PRIMARY KEY CHECK (id = 1),
    state_id text NOT NULL,
    next_event_seq bigint NOT NULL CHECK (next_event_seq >= 1)
);

INSERT INTO state_meta (id, state_id, next_event_seq)
VALUES (1, substr(md5(random()::text || clock_timestamp()::text), 1, 16), 1);

-- One row per sandbox. `record` is the SandboxStatus JSON; `tenant`, `state`
-- and `live` repeat it for the scans. A live sandbox is owned by one host
-- (`owner_host`) until `lease_until_ms` (the database's clock): the owner
-- renews it, and only the owner writes the row. Once the lease has run out,
-- another host takes the sandbox over (UPDATE ... RETURNING).
CREATE TABLE sandboxes (
    id text PRIMARY KEY,
    tenant text NOT NULL,
    state text NOT NULL,
    live boolean NOT NULL,
    owner_host text NOT NULL,
    lease_until_ms bigint NOT NULL,
    created_at_ms bigint NOT NULL,
    updated_at_ms bigint NOT NULL,
    record text NOT NULL
);

CREATE INDEX sandboxes_live_owner ON sandboxes (owner_host) WHERE live;
CREATE INDEX sandboxes_live_lease ON sandboxes (lease_until_ms) WHERE live;

-- The lifecycle outbox: one CloudEvent per state change, written in the
-- same transaction as the record.
CREATE TABLE lifecycle_events (
    seq bigint PRIMARY KEY,
    event text NOT NULL
);

-- Each extension instance's key-value store, shared by every host so that a
-- host taking a sandbox over finds what its extension kept at create.
CREATE TABLE extension_kv (
    instance text NOT NULL,
    key text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (instance, key)
);

-- Keys and bytes per instance, updated in the same transaction as the
-- writes, so checking the quota reads one row.
CREATE TABLE extension_kv_usage (
    instance text PRIMARY KEY,
    keys bigint NOT NULL CHECK (keys >= 0),
    bytes bigint NOT NULL CHECK (bytes >= 0)
);

-- Tenants and their keys, and the operators' keys, so that a key works at
-- every host behind the load balancer. Keys are stored only as SHA-256.
CREATE TABLE tenants (
    name text PRIMARY KEY,
    revoked boolean NOT NULL,
    row text NOT NULL
);

CREATE TABLE tenant_keys (
    key_sha256 text PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE operator_keys (
    key_sha256 text PRIMARY KEY,
    created_at_ms bigint NOT NULL
);

-- Where delivery to a shared sink (the webhook) stands, per sink and outbox,
-- and which host delivers it: one host at a time, under a lease it renews
-- each time it delivers, so every event reaches the hub once (again only
-- after a crash), not once per host.
CREATE TABLE delivery_cursors (
    sink text NOT NULL,
    source text NOT NULL,
    seq bigint NOT NULL CHECK (seq >= 0),
    holder text NOT NULL,
    until_ms bigint NOT NULL,
    PRIMARY KEY (sink, source)
);
