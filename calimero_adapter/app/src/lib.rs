//! # MediChain ledger: the round protocol's state, as a Calimero app
//!
//! MediChain's real-deployment mode exchanges federated-learning round records
//! between hospitals through a Calimero context. The Python side speaks a
//! minimal ledger (`set` / `get` / `entries` plus events) so that it also runs on
//! Calimero's stock `kv-store` app; this app exposes the very same ledger, with the
//! same method names, argument names and events, and adds coordinator-only round
//! operations plus the rules below.
//!
//! ## Keys
//!
//! ```text
//! medichain/<run>/round/<round>/open            open_round      coordinator, write-once
//! medichain/<run>/round/<round>/global          publish_global  coordinator, write-once
//! medichain/<run>/site/<site>                   set             any member once; coordinator
//!                                               register_site   (again = key rotation)
//! medichain/<run>/round/<round>/update/<site>   set             any member, write-once
//! medichain/<run>/round/<round>/eval/<site>     set             any member, write-once
//! any other medichain/ key (e.g. roster/<site>) set             coordinator
//! anything outside medichain/                   set / remove    plain kv-store semantics
//! ```
//!
//! `<run>` and `<site>` are non-empty and contain no `/`; `<round>` is a decimal
//! `u64` without leading zeros (exactly what `format!("{round}")` writes).
//!
//! ## The write rule (what this app enforces)
//!
//! * `set` on a key outside `medichain/` behaves exactly like kv-store's `set`
//!   (insert or overwrite, `Inserted` / `Updated` event).
//! * **Sites** (every member but the coordinator) may `set` under `medichain/`
//!   only a well-formed update key `medichain/<run>/round/<r>/update/<site>`, an
//!   evaluation key `.../round/<r>/eval/<site>` or their registration
//!   `medichain/<run>/site/<site>`, each only if it does not exist yet: the slots
//!   are **write-once**, so a second submission for the same site and round is
//!   rejected (no double submission, no overwriting someone's update). Every other
//!   `medichain/` key is rejected.
//! * The **coordinator** writes the round records with `open_round`,
//!   `publish_global` and `register_site`. So that the protocol's generic ledger
//!   (`set` only, as on kv-store) also runs here, the coordinator's own `set` on
//!   those keys is accepted with the same rules and events (`open` and `global`
//!   write-once, `RoundOpened` / `GlobalPublished` / `SiteRegistered`), and so
//!   is its `set` on any other `medichain/` key (e.g. a roster entry).
//! * `open` and `global` are write-once (a round's manifest and its global model
//!   do not change once published); a site's registration may be replaced by the
//!   coordinator (key rotation), emitting `Updated`.
//! * `remove` of a `medichain/` key is coordinator-only (cleaning up a finished
//!   run); outside `medichain/` it is kv-store's `remove`.
//! * The coordinator is the identity recorded by `init(coordinator)`, and every
//!   coordinator-only call compares it with the caller (see [`caller_is`]).
//!
//! ## What this app does NOT do
//!
//! It never trusts or interprets content. Values are opaque strings (JSON
//! manifests of a few KB; model weights travel as Calimero blobs, never in state,
//! because a state-sync record is limited to 1 MiB, hence [`MAX_VALUE_BYTES`]).
//! Integrity and authorship of every manifest are checked by the Python side:
//! each manifest is signed with Ed25519 by its writer, and readers verify the
//! signature against the keys the coordinator admitted; the app never sees a
//! signature. The
//! write-once check runs on the node that executes the call, against the state it
//! has: two submissions for the same slot made concurrently on two nodes before
//! they synced would be merged last-writer-wins by the CRDT, which is one more
//! reason the Python side verifies signatures rather than trusting the ledger.
//!
//! SDK: calimero-network/core at tag `0.11.0-rc.25` (see Cargo.toml and README.md).

use std::collections::BTreeMap;

use calimero_sdk::serde::Serialize;
use calimero_sdk::{app, env, AccountId, PublicKey};
use calimero_storage::collections::{LwwRegister, UnorderedMap};
use thiserror::Error;

/// The prefix every MediChain protocol key lives under.
pub const PREFIX: &str = "medichain/";

/// Largest value (or manifest) accepted under `medichain/`, in bytes. Manifests
/// are a few KB; anything near the 1 MiB state-sync record limit is a mistake
/// (weights belong in blobs).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

#[app::state(emits = for<'a> Event<'a>)]
pub struct MedichainLedger {
    /// The ledger itself, laid out like kv-store's state.
    items: UnorderedMap<String, LwwRegister<String>>,
    /// The identity allowed to run round operations (see [`caller_is`]).
    coordinator: LwwRegister<String>,
}

#[app::event]
pub enum Event<'a> {
    // kv-store's events, emitted for every ledger write (round operations too),
    // so a subscriber written against kv-store sees every key change.
    Inserted { key: &'a str, value: &'a str },
    Updated { key: &'a str, value: &'a str },
    Removed { key: &'a str },
    // MediChain round events.
    RoundOpened { run: &'a str, round: u64 },
    GlobalPublished { run: &'a str, round: u64 },
    SiteRegistered { run: &'a str, site: &'a str },
}

#[derive(Debug, Error, Serialize)]
#[serde(crate = "calimero_sdk::serde")]
#[serde(tag = "kind", content = "data")]
pub enum Error {
    #[error("only the coordinator may call {0}")]
    NotCoordinator(String),
    #[error("key already written (write-once): {0}")]
    AlreadyWritten(String),
    #[error("key is reserved for the coordinator's round operations: {0}")]
    ReservedKey(String),
    #[error("invalid {what}: {value:?} (must be non-empty and contain no '/')")]
    InvalidName { what: String, value: String },
    #[error("value for {key} is {len} bytes, over the {max}-byte limit")]
    ValueTooLarge { key: String, len: usize, max: usize },
}

/// `medichain/<run>/round/<round>/open`
#[must_use]
pub fn open_key(run: &str, round: u64) -> String {
    format!("{PREFIX}{run}/round/{round}/open")
}

/// `medichain/<run>/round/<round>/global`
#[must_use]
pub fn global_key(run: &str, round: u64) -> String {
    format!("{PREFIX}{run}/round/{round}/global")
}

/// `medichain/<run>/site/<site>`
#[must_use]
pub fn site_key(run: &str, site: &str) -> String {
    format!("{PREFIX}{run}/site/{site}")
}

/// `medichain/<run>/round/<round>/update/<site>`
#[must_use]
pub fn update_key(run: &str, round: u64, site: &str) -> String {
    format!("{PREFIX}{run}/round/{round}/update/{site}")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/')
}

fn canonical_round(round: &str) -> Option<u64> {
    round.parse::<u64>().ok().filter(|r| r.to_string() == round)
}

/// What a key under `medichain/` names (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolKey {
    Open {
        run: String,
        round: u64,
    },
    Global {
        run: String,
        round: u64,
    },
    Update {
        run: String,
        round: u64,
        site: String,
    },
    Site {
        run: String,
        site: String,
    },
    Eval {
        run: String,
        round: u64,
        site: String,
    },
    /// Any other key under `medichain/` (a roster entry, or a malformed key).
    Other,
}

impl ProtocolKey {
    /// `None` for a key outside `medichain/`. Only the exact spellings the key
    /// functions above write are recognised (one slot, one spelling: no
    /// `round/007`); anything else under the prefix is [`ProtocolKey::Other`].
    #[must_use]
    pub fn parse(key: &str) -> Option<ProtocolKey> {
        let rest = key.strip_prefix(PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let parsed = match parts.as_slice() {
            [run, "round", round, "open"] if valid_name(run) => {
                canonical_round(round).map(|round| ProtocolKey::Open {
                    run: (*run).to_owned(),
                    round,
                })
            }
            [run, "round", round, "global"] if valid_name(run) => {
                canonical_round(round).map(|round| ProtocolKey::Global {
                    run: (*run).to_owned(),
                    round,
                })
            }
            [run, "round", round, "update", site] if valid_name(run) && valid_name(site) => {
                canonical_round(round).map(|round| ProtocolKey::Update {
                    run: (*run).to_owned(),
                    round,
                    site: (*site).to_owned(),
                })
            }
            [run, "site", site] if valid_name(run) && valid_name(site) => Some(ProtocolKey::Site {
                run: (*run).to_owned(),
                site: (*site).to_owned(),
            }),
            [run, "round", round, "eval", site] if valid_name(run) && valid_name(site) => {
                canonical_round(round).map(|round| ProtocolKey::Eval {
                    run: (*run).to_owned(),
                    round,
                    site: (*site).to_owned(),
                })
            }
            _ => None,
        };
        Some(parsed.unwrap_or(ProtocolKey::Other))
    }
}

/// Whether the caller of this execution is the identity `recorded`.
///
/// `recorded` may name the caller's **account** (64 hex characters, what
/// `AccountId` displays and what `merobox`'s `node_identity` step reports as
/// `accountId`) or the caller's **device key** (base58, what `PublicKey`
/// displays, e.g. a context's `memberPublicKey`). The two encodings cannot collide
/// (a base58 32-byte key is shorter than 64 characters), so accepting either is
/// no wider than accepting the one that was recorded.
///
/// In SDK 0.11 `env::account_id()` and `env::device_id()` replaced the former
/// `env::executor_id()`, and the node answers a pre-0.11 `executor_id` import
/// with the account.
fn caller_is(recorded: &str) -> bool {
    if recorded.is_empty() {
        return false;
    }
    recorded == AccountId::from(env::account_id()).to_string()
        || recorded == PublicKey::from(env::device_id()).to_string()
}

#[app::logic]
impl MedichainLedger {
    /// Creates the ledger and records the coordinator's identity (an account id
    /// in hex or a device public key in base58; see [`caller_is`]). An empty
    /// string records the account of whoever creates the context.
    #[app::init]
    pub fn init(coordinator: String) -> MedichainLedger {
        let coordinator = if coordinator.trim().is_empty() {
            AccountId::from(env::account_id()).to_string()
        } else {
            coordinator.trim().to_owned()
        };
        app::log!("MediChain ledger: coordinator {}", coordinator);

        MedichainLedger {
            items: UnorderedMap::new(),
            coordinator: LwwRegister::new(coordinator),
        }
    }

    // ---- kv-store-compatible ledger ------------------------------------------

    /// kv-store's `set` outside `medichain/`; under it, a write-once site update
    /// from anyone, and the other protocol keys from the coordinator only (see
    /// the module docs).
    pub fn set(&mut self, key: String, value: String) -> app::Result<()> {
        app::log!("set {:?} ({} bytes)", key, value.len());

        let Some(kind) = ProtocolKey::parse(&key) else {
            return self.write(key, value);
        };
        Self::check_size(&key, &value)?;
        let coordinator = self.is_coordinator();
        let site_slot = matches!(
            kind,
            ProtocolKey::Update { .. } | ProtocolKey::Eval { .. } | ProtocolKey::Site { .. }
        );
        if !site_slot && !coordinator {
            app::bail!(Error::ReservedKey(key));
        }

        match kind {
            ProtocolKey::Update { .. } | ProtocolKey::Eval { .. } => self.write_once(key, value),
            ProtocolKey::Open { run, round } => {
                self.write_once(key, value)?;
                app::emit!(Event::RoundOpened { run: &run, round });
                Ok(())
            }
            ProtocolKey::Global { run, round } => {
                self.write_once(key, value)?;
                app::emit!(Event::GlobalPublished { run: &run, round });
                Ok(())
            }
            ProtocolKey::Site { run, site } => {
                // a hospital registers itself once; the coordinator may replace it (rotation)
                if coordinator {
                    self.write(key, value)?;
                } else {
                    self.write_once(key, value)?;
                }
                app::emit!(Event::SiteRegistered {
                    run: &run,
                    site: &site
                });
                Ok(())
            }
            ProtocolKey::Other => self.write(key, value),
        }
    }

    #[app::view]
    pub fn get(&self, key: String) -> app::Result<Option<String>> {
        app::log!("get {:?}", key);

        Ok(self.items.get(key.as_str())?.map(|v| v.get().clone()))
    }

    #[app::view]
    pub fn entries(&self) -> app::Result<BTreeMap<String, String>> {
        app::log!("entries");

        Ok(self
            .items
            .entries()?
            .map(|(k, v)| (k, v.get().clone()))
            .collect())
    }

    /// The entries whose key starts with `prefix`, e.g. every update of a round:
    /// `medichain/<run>/round/<round>/update/`.
    #[app::view]
    pub fn entries_with_prefix(&self, prefix: String) -> app::Result<BTreeMap<String, String>> {
        app::log!("entries_with_prefix {:?}", prefix);

        Ok(self
            .items
            .entries()?
            .filter(|(k, _)| k.starts_with(prefix.as_str()))
            .map(|(k, v)| (k, v.get().clone()))
            .collect())
    }

    /// kv-store's `remove` outside `medichain/`; under it, coordinator-only.
    pub fn remove(&mut self, key: String) -> app::Result<Option<String>> {
        app::log!("remove {:?}", key);

        if key.starts_with(PREFIX) {
            self.ensure_coordinator("remove")?;
        }

        // Emit `Removed` only when a value was actually there, as kv-store does.
        let removed = self.items.remove(key.as_str())?.map(|v| v.get().clone());
        if removed.is_some() {
            app::emit!(Event::Removed { key: &key });
        }

        Ok(removed)
    }

    /// The recorded coordinator identity.
    #[app::view]
    pub fn coordinator(&self) -> app::Result<String> {
        Ok(self.coordinator.get().clone())
    }

    // ---- coordinator-only round operations -------------------------------------

    /// Opens round `round` of run `run`: writes `manifest` (write-once) at
    /// `medichain/<run>/round/<round>/open`.
    pub fn open_round(&mut self, run: String, round: u64, manifest: String) -> app::Result<()> {
        self.ensure_coordinator("open_round")?;
        Self::check_name("run", &run)?;

        let key = open_key(&run, round);
        Self::check_size(&key, &manifest)?;

        self.write_once(key, manifest)?;
        app::emit!(Event::RoundOpened { run: &run, round });

        Ok(())
    }

    /// Publishes the global model manifest of round `round` (write-once) at
    /// `medichain/<run>/round/<round>/global`.
    pub fn publish_global(&mut self, run: String, round: u64, manifest: String) -> app::Result<()> {
        self.ensure_coordinator("publish_global")?;
        Self::check_name("run", &run)?;

        let key = global_key(&run, round);
        Self::check_size(&key, &manifest)?;

        self.write_once(key, manifest)?;
        app::emit!(Event::GlobalPublished { run: &run, round });

        Ok(())
    }

    /// Records site `site`'s public key (the Ed25519 key its manifests are
    /// signed with) at `medichain/<run>/site/<site>`. Registering again replaces
    /// the key (rotation).
    pub fn register_site(
        &mut self,
        run: String,
        site: String,
        public_key: String,
    ) -> app::Result<()> {
        self.ensure_coordinator("register_site")?;
        Self::check_name("run", &run)?;
        Self::check_name("site", &site)?;

        let key = site_key(&run, &site);
        Self::check_size(&key, &public_key)?;

        self.write(key, public_key)?;
        app::emit!(Event::SiteRegistered {
            run: &run,
            site: &site
        });

        Ok(())
    }
}

// Helpers: a plain impl block, so none of these is exported as a method.
impl MedichainLedger {
    /// Inserts or overwrites `key`, emitting kv-store's `Inserted` / `Updated`.
    fn write(&mut self, key: String, value: String) -> app::Result<()> {
        if self.items.contains(&key)? {
            app::emit!(Event::Updated {
                key: &key,
                value: &value,
            });
        } else {
            app::emit!(Event::Inserted {
                key: &key,
                value: &value,
            });
        }

        self.items.insert(key, value.into())?;

        Ok(())
    }

    /// [`Self::write`], refused when `key` already exists.
    fn write_once(&mut self, key: String, value: String) -> app::Result<()> {
        if self.items.contains(&key)? {
            app::bail!(Error::AlreadyWritten(key));
        }
        self.write(key, value)
    }

    fn is_coordinator(&self) -> bool {
        caller_is(self.coordinator.get())
    }

    fn ensure_coordinator(&self, method: &str) -> app::Result<()> {
        if !self.is_coordinator() {
            app::bail!(Error::NotCoordinator(method.to_owned()));
        }
        Ok(())
    }

    fn check_name(what: &str, value: &str) -> app::Result<()> {
        if !valid_name(value) {
            app::bail!(Error::InvalidName {
                what: what.to_owned(),
                value: value.to_owned(),
            });
        }
        Ok(())
    }

    fn check_size(key: &str, value: &str) -> app::Result<()> {
        if value.len() > MAX_VALUE_BYTES {
            app::bail!(Error::ValueTooLarge {
                key: key.to_owned(),
                len: value.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use calimero_sdk::testing::TestHost;

    use super::*;

    const COORD_ACCOUNT: [u8; 32] = [0xC0; 32];
    const COORD_DEVICE: [u8; 32] = [0xC1; 32];
    const SITE_ACCOUNT: [u8; 32] = [0x51; 32];
    const SITE_DEVICE: [u8; 32] = [0x52; 32];

    fn hex(bytes: [u8; 32]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn ledger() -> TestHost<MedichainLedger> {
        TestHost::new(|| MedichainLedger::init(hex(COORD_ACCOUNT)))
    }

    #[test]
    fn key_shapes() {
        use ProtocolKey::{Global, Open, Other, Site, Update};

        let parse = |k: &str| ProtocolKey::parse(k);
        let (run, site) = ("run-1".to_owned(), "h1".to_owned());

        assert_eq!(
            parse(&update_key("run-1", 0, "h1")),
            Some(Update {
                run: run.clone(),
                round: 0,
                site: site.clone()
            })
        );
        assert_eq!(
            parse(&open_key("run-1", 12)),
            Some(Open {
                run: run.clone(),
                round: 12
            })
        );
        assert_eq!(
            parse(&global_key("run-1", 3)),
            Some(Global {
                run: run.clone(),
                round: 3
            })
        );
        assert_eq!(parse(&site_key("run-1", "h1")), Some(Site { run, site }));
        assert_eq!(parse("medichain/r/roster/h1"), Some(Other));
        assert_eq!(parse("medichain/r/round/012/update/s"), Some(Other));
        assert_eq!(parse("medichain/r/round/x/update/s"), Some(Other));
        assert_eq!(parse("medichain/r/round/1/update/"), Some(Other));
        assert_eq!(parse("medichain/r/round/1/update/s/extra"), Some(Other));
        assert_eq!(parse("medichain//round/1/open"), Some(Other));
        assert_eq!(parse("other/r/round/1/update/s"), None);
        assert_eq!(parse("medichain"), None);
    }

    #[test]
    fn kv_store_semantics_outside_the_prefix() {
        let mut app = ledger();

        app.call(|s| s.set("k".into(), "v".into())).unwrap();
        app.call(|s| s.set("k".into(), "w".into())).unwrap();
        assert_eq!(
            app.view(|s| s.get("k".into())).unwrap(),
            Some("w".to_owned())
        );
        assert_eq!(
            app.call(|s| s.remove("k".into())).unwrap(),
            Some("w".to_owned())
        );
        assert_eq!(app.view(|s| s.get("k".into())).unwrap(), None);

        let kinds: Vec<String> = app.events().iter().map(|e| e.kind.to_string()).collect();
        assert_eq!(kinds, ["Inserted", "Updated", "Removed"]);
    }

    #[test]
    fn round_operations_are_coordinator_only() {
        let mut app = ledger();

        let denied = app.call_as_account(SITE_ACCOUNT, SITE_DEVICE, |s| {
            s.open_round("run".into(), 0, "{}".into())
        });
        assert!(denied.is_err());

        app.call_as_account(COORD_ACCOUNT, COORD_DEVICE, |s| {
            s.register_site("run".into(), "h1".into(), "pk".into())?;
            s.open_round("run".into(), 0, "{\"round\":0}".into())
        })
        .unwrap();

        assert_eq!(
            app.view(|s| s.get(open_key("run", 0))).unwrap(),
            Some("{\"round\":0}".to_owned())
        );
        assert_eq!(
            app.view(|s| s.get(site_key("run", "h1"))).unwrap(),
            Some("pk".to_owned())
        );

        // Write-once: the round's manifest does not change.
        let again = app.call_as_account(COORD_ACCOUNT, COORD_DEVICE, |s| {
            s.open_round("run".into(), 0, "{}".into())
        });
        assert!(again.is_err());
    }

    #[test]
    fn updates_are_write_once_and_other_protocol_keys_reserved() {
        let mut app = ledger();
        let key = update_key("run", 0, "h1");

        app.call_as_account(SITE_ACCOUNT, SITE_DEVICE, |s| {
            s.set(key.clone(), "u1".into())
        })
        .unwrap();
        let second = app.call_as_account(SITE_ACCOUNT, SITE_DEVICE, |s| {
            s.set(key.clone(), "u2".into())
        });
        assert!(second.is_err());
        assert_eq!(
            app.view(|s| s.get(key.clone())).unwrap(),
            Some("u1".to_owned())
        );

        for reserved in [
            open_key("run", 0),
            global_key("run", 0),
            "medichain/run/roster/h1".to_owned(),
        ] {
            let r = app.call_as_account(SITE_ACCOUNT, SITE_DEVICE, |s| s.set(reserved, "x".into()));
            assert!(r.is_err());
        }

        // a hospital registers itself and reports its evaluation once each
        for slot in [site_key("run", "h1"), "medichain/run/round/3/eval/h1".to_owned()] {
            app.call_as_account(SITE_ACCOUNT, SITE_DEVICE, |s| s.set(slot.clone(), "a".into()))
                .unwrap();
            let again =
                app.call_as_account(SITE_ACCOUNT, SITE_DEVICE, |s| s.set(slot.clone(), "b".into()));
            assert!(again.is_err());
        }

        // Sites cannot remove protocol keys; the coordinator can.
        let r = app.call_as_account(SITE_ACCOUNT, SITE_DEVICE, |s| s.remove(key.clone()));
        assert!(r.is_err());
        let r = app.call_as_account(COORD_ACCOUNT, COORD_DEVICE, |s| s.remove(key.clone()));
        assert_eq!(r.unwrap(), Some("u1".to_owned()));
    }

    #[test]
    fn coordinator_set_follows_the_round_rules() {
        let mut app = ledger();
        let open = open_key("run", 0);

        app.call_as_account(COORD_ACCOUNT, COORD_DEVICE, |s| {
            s.set(open.clone(), "{}".into())?;
            s.set(site_key("run", "h1"), "pk1".into())?;
            s.set(site_key("run", "h1"), "pk2".into())?;
            s.set("medichain/run/roster/h1".into(), "admitted".into())
        })
        .unwrap();
        let kinds: Vec<String> = app.events().iter().map(|e| e.kind.to_string()).collect();
        assert_eq!(
            kinds,
            [
                "Inserted",
                "RoundOpened",
                "Inserted",
                "SiteRegistered",
                "Updated",
                "SiteRegistered",
                "Inserted"
            ]
        );

        // `open` stays write-once for the coordinator too.
        let again = app.call_as_account(COORD_ACCOUNT, COORD_DEVICE, |s| s.set(open, "{}".into()));
        assert!(again.is_err());

        // A site cannot write the roster.
        let r = app.call_as_account(SITE_ACCOUNT, SITE_DEVICE, |s| {
            s.set("medichain/run/roster/h2".into(), "admitted".into())
        });
        assert!(r.is_err());
    }

    #[test]
    fn the_coordinator_may_be_named_by_device_key() {
        let key = PublicKey::from(COORD_DEVICE).to_string();
        let mut app = TestHost::new(|| MedichainLedger::init(key));
        app.call_as_account(SITE_ACCOUNT, COORD_DEVICE, |s| {
            s.open_round("run".into(), 0, "{}".into())
        })
        .unwrap();
    }

    #[test]
    fn entries_with_prefix_filters() {
        let mut app = ledger();
        app.call(|s| s.set(update_key("run", 0, "h1"), "a".into()))
            .unwrap();
        app.call(|s| s.set(update_key("run", 0, "h2"), "b".into()))
            .unwrap();
        app.call(|s| s.set(update_key("run", 1, "h1"), "c".into()))
            .unwrap();
        app.call(|s| s.set("unrelated".into(), "d".into())).unwrap();

        let round0 = app
            .view(|s| s.entries_with_prefix("medichain/run/round/0/update/".into()))
            .unwrap();
        assert_eq!(round0.len(), 2);
        assert_eq!(app.view(|s| s.entries()).unwrap().len(), 4);
    }

    #[test]
    fn oversized_values_are_rejected() {
        let mut app = ledger();
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(app
            .call(|s| s.set(update_key("run", 0, "h1"), big))
            .is_err());
    }

    #[test]
    fn empty_coordinator_records_the_creator() {
        let app = TestHost::new(|| MedichainLedger::init(String::new()));
        let creator = hex(app.account_id());
        assert_eq!(app.view(|s| s.coordinator()).unwrap(), creator);
    }
}
