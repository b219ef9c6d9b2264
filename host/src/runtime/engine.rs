//! The one wasmtime `Engine` of a host process and its epoch ticker.
//!
//! Wall-clock deadlines have two halves. Epoch interruption stops guest code:
//! a background thread bumps the engine's epoch every [`EPOCH_TICK`]; at each
//! tick a running guest yields to the executor (so one busy guest never
//! holds a worker thread), and once its deadline (in ticks) has passed it
//! traps. A call blocked inside a host call (a WASI sleep, a socket wait)
//! runs no guest code, so calls are async and the caller drops them at the
//! deadline. Calls run on the caller's tokio runtime; the runtime needs its
//! time and I/O drivers (WASI's timers and sockets). Fuel metering is
//! compiled in so an operator can give any extension a fuel budget;
//! extensions without one get an unlimited tank. Component-model async is
//! left out: nothing here uses it and it costs every call. Instances come
//! from a pooling allocator (no mmap/munmap per call: about half the cost of
//! a call here), falling back to on-demand allocation where the pool's
//! address space cannot be reserved.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, WasmBacktraceDetails,
};

/// How often the epoch advances: the resolution of every wall-clock limit.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

pub fn new_engine() -> wasmtime::Result<Engine> {
    let mut config = base_config();
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(POOLED_COMPONENT_INSTANCES)
        .total_core_instances(POOLED_COMPONENT_INSTANCES * 16)
        .total_memories(POOLED_COMPONENT_INSTANCES * 2)
        .total_tables(POOLED_COMPONENT_INSTANCES * 2)
        .max_memory_size(4 << 30);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&config) {
        Ok(engine) => Ok(engine),
        Err(error) => {
            // The pool reserves address space up front; where that is not
            // allowed, allocate each instance on demand instead.
            tracing::warn!("cannot reserve the instance pool, allocating on demand: {error:#}");
            Engine::new(&base_config())
        }
    }
}

/// Instances that can be alive at once in the pool: calls beyond it fail
/// with a clear error rather than wait.
const POOLED_COMPONENT_INSTANCES: u32 = 200;

fn base_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.concurrency_support(false);
    config.epoch_interruption(true);
    config.consume_fuel(true);
    config.wasm_backtrace_details(WasmBacktraceDetails::Disable);
    config
}

/// Epoch ticks that cover `timeout`, plus one so a call never gets less than
/// its full limit.
pub fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    (timeout.as_nanos().div_ceil(tick) as u64).saturating_add(1)
}

/// Advances the engine's epoch until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.clone();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawn the epoch ticker thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_whole_ticks_plus_one() {
        assert_eq!(deadline_ticks(Duration::from_millis(10)), 2);
        assert_eq!(deadline_ticks(Duration::from_millis(11)), 3);
        assert_eq!(deadline_ticks(Duration::from_millis(1000)), 101);
    }
}
