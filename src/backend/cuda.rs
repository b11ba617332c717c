//! The CUDA backend: bf16 storage, fp32 accumulation, cuBLAS for the GEMMs and our kernels from
//! `cuda/` (embedded as one fatbin by build.rs) for everything else.
//!
//! Storage follows llm.c: weights, activations and activation gradients are bf16; what needs
//! the range or the resolution of f32 is f32: normalization and attention statistics, gradients
//! of parameters (they accumulate over micro-batches) and optimizer moments. `Backend::alloc`
//! gives bf16, `Backend::alloc_f32` gives f32, and each op checks the dtypes it is handed, so a
//! mismatch is an error that names the op, never silently wrong numbers.
//!
//! Everything runs on one stream. Ops are infallible like CUDA launches themselves: the first
//! error is kept and returned by the next `download`/`sync`. Host data an op needs on the
//! device (token ids, targets, per-row coefficients) is staged through small buffers that are
//! grown once and reused, so steady-state layers neither allocate nor copy.

use super::{AdamWStep, AttnShape, Backend, Starts, StatsLoss, Traffic, NO_TARGET};
use crate::device::KERNELS_FATBIN;
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use half::bf16;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bf16,
    F32,
}

impl Dtype {
    fn suffix(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
        }
    }
    fn blas(self) -> blas_sys::cudaDataType {
        match self {
            Dtype::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            Dtype::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        }
    }
}

fn blas_op(transpose: bool) -> blas_sys::cublasOperation_t {
    if transpose {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

enum Mem {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

/// Host memory the GPU copies f32 values to and from (`Backend::Host`): page-locked, or pageable
/// where the driver would not lock that much.
pub enum CudaHost {
    Pinned(PinnedHost),
    Pageable(Vec<f32>),
}

/// Page-locked memory, with the stream its copies are queued on. A copy to or from it may still
/// be running when the host drops it (the last download of an offloaded update is not waited
/// for), so dropping it waits for the stream first: freeing memory the copy engine is using is
/// not something the driver promises to make safe. cudarc's own guard, an event per slice, is
/// only recorded when it tracks several streams, which this backend turns off.
pub struct PinnedHost {
    mem: PinnedHostSlice<f32>,
    stream: Arc<CudaStream>,
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

impl CudaHost {
    fn len(&self) -> usize {
        match self {
            CudaHost::Pinned(p) => p.mem.len(),
            CudaHost::Pageable(v) => v.len(),
        }
    }
}

/// Bytes held by live buffers and scratch, and the most held since the last reset.
#[derive(Default)]
struct MemCounter {
    live: AtomicUsize,
    peak: AtomicUsize,
}

/// A device buffer of `len` logical values in bf16 or f32 storage.
pub struct CudaBuf {
    mem: Mem,
    /// The raw device address, taken once: kernels get plain pointers.
    ptr: u64,
    len: usize,
    bytes: usize,
    counter: Arc<MemCounter>,
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        self.counter.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl CudaBuf {
    pub fn dtype(&self) -> Dtype {
        match self.mem {
            Mem::Bf16(_) => Dtype::Bf16,
            Mem::F32(_) => Dtype::F32,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// One kernel argument. Launches take a slice of these, which outlives the launch builder
/// that holds pointers to them.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    U(u64),
}

/// Page-locked host buffers for the small uploads of `stage_u32` (token ids, cache lengths). A
/// copy from pageable memory may make the driver wait for the stream to drain first (CUDA's "API
/// synchronization behavior"), which then idles the GPU for a launch latency on every upload:
/// likely why the embedding gather, which uploads its ids, stopped at 73% of copy bandwidth on
/// the H100. A copy from pinned memory is queued like a kernel. The slots are used in turn, and
/// each has the event recorded after the last copy that read it, so a slot is rewritten only once
/// that copy has run; with PINNED_SLOTS of them the host runs that many uploads ahead.
#[derive(Default)]
struct PinnedRing {
    slots: Vec<(PinnedHostSlice<u32>, CudaEvent)>,
    next: usize,
    /// Page-locked memory could not be had: stay with pageable copies.
    unavailable: bool,
}
const PINNED_SLOTS: usize = 8;

impl Drop for PinnedRing {
    fn drop(&mut self) {
        // Page-locked memory must outlive the copies queued from it.
        for (_, done) in &self.slots {
            let _ = done.synchronize();
        }
    }
}

/// Host data staged on the device for one op; each slot has its own buffer so that one op can
/// use several at once.
#[derive(Clone, Copy)]
enum Slot {
    Ids = 0,
    KvLen = 1,
    Starts = 2,
}
const SLOTS: usize = 3;

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Dropped by hand (`Drop for CudaBackend`).
    blas: ManuallyDrop<CudaBlas>,
    module: Arc<CudaModule>,
    funcs: RefCell<HashMap<String, CudaFunction>>,
    /// The dynamic shared memory each kernel has opted into (`launch`).
    smem_opted: RefCell<HashMap<String, u32>>,
    /// Blocks per SM of (kernel, threads per block), for the grids sized to what is resident.
    occupancy: RefCell<HashMap<(String, u32), u32>>,
    staging: RefCell<[Option<CudaSlice<u32>>; SLOTS]>,
    /// Page-locked host memory the staged values are copied from (`PinnedRing`).
    pinned: RefCell<PinnedRing>,
    /// The host values last staged in each slot by `stage_cached`: every layer of a decode step
    /// passes the same lengths and starts, so only the first copies them.
    staged: RefCell<[Option<Vec<u32>>; SLOTS]>,
    /// Float scratch for multi-pass kernels (attention backward), grown on demand.
    scratch: RefCell<Vec<Option<CudaSlice<f32>>>>,
    sm_count: u32,
    /// The training attention kernels for head_dim 128 (see [`AttnKernels`]).
    attn: Cell<AttnKernels>,
    /// False under `EMPO_WGMMA=0`: the wgmma kernels are neither run nor checked nor timed, as
    /// on a GPU without them (a way round them should the hardware disagree with them).
    wgmma_allowed: bool,
    /// Launch the kernels that `programmatic` names with programmatic stream serialization, on
    /// sm_90 and later: on unless `EMPO_PDL=0`.
    pdl: Cell<bool>,
    error: RefCell<Option<String>>,
    mem: Arc<MemCounter>,
    /// Every allocation and host-device copy this backend makes (`Backend::traffic`).
    traffic: Cell<Traffic>,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // cudarc's CudaBlas unwraps cublasDestroy, which fails once a fault has killed the
        // context: the process would abort on its way out of a run that had already reported
        // the fault. On a dead context the handle is left for the process's end.
        if self.stream.synchronize().is_ok() {
            // SAFETY: the handle is not used after this.
            unsafe { ManuallyDrop::drop(&mut self.blas) }
        }
    }
}

/// Which kernels run training attention (forward and backward).
///
/// `Wgmma` (warpgroup MMA, head_dim 128 on sm_90 with sm_90a in the fatbin; mma.sync at other
/// head dims) is the default where it can run, `Mma` (mma.sync, any sm_80+ GPU) elsewhere;
/// `EMPO_ATTENTION=mma` picks it on an H100 too (`EMPO_WGMMA=0` leaves the wgmma kernels out
/// altogether). `Unfused` (cuBLAS strided-batched
/// GEMMs over materialized scores, any head_dim) is the baseline the flash kernels are timed
/// against; `EMPO_ATTENTION=unfused` trains with it, in memory quadratic in the length.
/// `check-kernels` and `bench` cover every set that can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernels {
    Mma,
    Wgmma,
    Unfused,
}

impl AttnKernels {
    pub fn name(self) -> &'static str {
        match self {
            AttnKernels::Mma => "mma",
            AttnKernels::Wgmma => "wgmma",
            AttnKernels::Unfused => "unfused",
        }
    }
}

/// The kernels that wait for the previous grid before they touch memory (`wait_for_prior_grids`
/// in cuda/common.cuh), which may therefore be launched with programmatic stream serialization:
/// the elementwise updates, SwiGLU, RMSNorm and RoPE. Not the embedding gather, whose ids are
/// copied in right before it.
fn programmatic(name: &str) -> bool {
    ["add_", "axpy_", "convert_"]
        .iter()
        .any(|p| name.starts_with(p))
        || matches!(
            name,
            "swiglu_fwd" | "swiglu_bwd" | "rmsnorm_fwd" | "rmsnorm_bwd" | "rope"
        )
}

/// Threads per block of the elementwise kernels; they loop over n with a grid stride.
const EW_BLOCK: u32 = 256;
/// Packs of 8 values each thread of the packed elementwise kernels has in flight (EW_U in
/// cuda/elementwise.cu).
const EW_U: u64 = 2;
/// 16-byte packs of a row each thread of the RMSNorm kernels holds (RMS_VPT in cuda/rmsnorm.cu).
const RMS_VPT: usize = 2;
/// rmsnorm_bwd's __launch_bounds__: it holds two rows' packs (cuda/rmsnorm.cu), so rows of up to
/// 8·RMS_VPT·640 = 10240 values take the pack path.
const RMS_BWD_MAX_THREADS: u32 = 640;
/// Heads each thread of the packed RoPE path rotates (ROPE_HG in cuda/rope.cu).
const ROPE_HG: usize = 4;
/// Threads per CTA of the softmax-statistics kernels, and the 16-byte packs of a row each thread
/// should stream (SME_THREADS in cuda/softmax_entropy.cu; the second sets how many CTAs share a
/// row).
const SME_THREADS: usize = 256;
const SME_PACKS_PER_THREAD: usize = 12;
/// The largest grid y (and z) a launch may have.
const MAX_GRID_Y: usize = 65535;

/// The float scratch buffers of `scratch_f32`, one slot per use, listed together so that no two
/// users share one by accident.
pub(super) mod slot {
    /// Training and decode attention (cuda_attention.rs).
    pub const DELTA: usize = 0;
    pub const DQ_ACCUM: usize = 1;
    pub const PART_O: usize = 2;
    pub const PART_ML: usize = 3;
    pub const LSE2: usize = 4;
    pub const DKV_ACCUM: usize = 5;
    /// The softmax forward: per-CTA partials and per-row arrival counters.
    pub const SME_PARTIAL: usize = 6;
    pub const SME_ARRIVED: usize = 7;
    /// Unfused attention (cuda_attention_unfused.rs): one sequence's [heads, tq, tk] scores and
    /// their gradient in f32, probabilities and score gradients in bf16 (two to a slot float).
    pub const SCORES: usize = 8;
    pub const DPROBS: usize = 9;
    pub const PROBS: usize = 10;
    pub const DSCORES: usize = 11;
}

/// Threads for a block that holds a row of `dim` bf16 values in registers, `vpt` 16-byte packs
/// per thread, rounded up to a warp; 256 for rows the kernels take on the scalar path.
fn row_block(dim: usize, vpt: usize) -> u32 {
    if !dim.is_multiple_of(8) || dim / 8 > vpt * 1024 {
        return 256;
    }
    ((dim / 8).div_ceil(vpt).next_multiple_of(32)).clamp(32, 1024) as u32
}

impl CudaBackend {
    /// Opens GPU `ordinal`, loads the embedded kernels and a cuBLAS handle. Every way this can
    /// fail (no kernels in the build, no driver library, no device, no cuBLAS) is an error
    /// that says which, never a panic.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        if KERNELS_FATBIN.is_empty() {
            bail!("this binary was built without CUDA kernels (nvcc was not found at build time; run tools/install-nvcc.sh and rebuild)");
        }
        // cudarc panics when a library it needs cannot be loaded, so look first.
        // SAFETY: these only try to dlopen the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("no CUDA driver library (libcuda.so) could be loaded: no NVIDIA driver on this machine");
        }
        let count =
            CudaContext::device_count().map_err(|e| anyhow!("cannot count CUDA devices: {e:?}"))?;
        if count <= 0 || ordinal >= count as usize {
            bail!("no CUDA device {ordinal}: {count} device(s) found");
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!("cuBLAS (libcublas.so.13) could not be loaded: add the CUDA 13 library folder to LD_LIBRARY_PATH");
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("cannot open CUDA device {ordinal}: {e:?}"))?;
        // One stream: stream order is all the synchronization we need, so cudarc's per-buffer
        // events would only cost time.
        // SAFETY: every buffer is used on this context's one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(KERNELS_FATBIN.to_vec()))
            .map_err(|e| anyhow!("cannot load the embedded CUDA kernels on device {ordinal}: {e:?} (built for {}; is the driver older than CUDA 13.0?)", kernel_targets()))?;
        let blas = CudaBlas::new(stream.clone())
            .map(ManuallyDrop::new)
            .map_err(|e| anyhow!("cannot create a cuBLAS handle: {e:?}"))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(80) as u32;
        let be = CudaBackend {
            ctx,
            stream,
            blas,
            module,
            funcs: RefCell::new(HashMap::new()),
            smem_opted: RefCell::new(HashMap::new()),
            occupancy: RefCell::new(HashMap::new()),
            staging: RefCell::new([None, None, None]),
            pinned: RefCell::new(PinnedRing::default()),
            staged: RefCell::new([None, None, None]),
            scratch: RefCell::new(Vec::new()),
            sm_count,
            attn: Cell::new(AttnKernels::Mma), // wgmma below, where it can run
            wgmma_allowed: std::env::var("EMPO_WGMMA").map_or(true, |v| v != "0"),
            pdl: Cell::new(false),
            error: RefCell::new(None),
            mem: Arc::new(MemCounter::default()),
            traffic: Cell::new(Traffic::default()),
        };
        // Both checked and timed on an H100 (docs/gpu/h100-09049fd-*): wgmma attention at
        // t 4096 ran the forward 13% and the backward 27% faster than mma.sync, and programmatic
        // launch sped up every memory-bound kernel it applies to (RMSNorm 84% -> 93% of copy).
        if be.has_wgmma() {
            be.attn.set(AttnKernels::Wgmma);
        }
        be.set_pdl(std::env::var("EMPO_PDL").map_or(true, |v| v != "0"));
        if let Ok(v) = std::env::var("EMPO_ATTENTION") {
            be.set_attention_variant(&v)
                .map_err(|e| anyhow!("EMPO_ATTENTION: {e}"))?;
        }
        Ok(be)
    }

    /// Whether the wgmma attention kernels can run: a compute capability 9.0 GPU, and sm_90a
    /// machine code in the fatbin (wgmma has no PTX form that other targets could carry).
    pub fn has_wgmma(&self) -> bool {
        self.wgmma_allowed
            && self.compute_capability() == (9, 0)
            && kernel_targets().contains("sm_90a")
    }

    /// The embedding gather from `rows` ids already on the device at `ids_ptr` (checked by the
    /// caller): `Backend::embedding` after its upload, and the bench's measure of the kernel
    /// alone.
    pub fn embedding_at(
        &self,
        out: &mut CudaBuf,
        table: &CudaBuf,
        ids_ptr: u64,
        rows: usize,
        dim: usize,
    ) {
        // EW_U packs of 8 per thread cover the row (224 threads for dim 3584, packed up to dim
        // 16384); the blocks that fit at once walk the rows (cuda/elementwise.cu).
        let block = ((dim / 8).div_ceil(EW_U as usize).next_multiple_of(32)).clamp(32, 1024) as u32;
        let resident = self.sm_count as usize * self.blocks_per_sm("embedding_fwd", block) as usize;
        self.launch(
            "embedding_fwd",
            (rows.min(resident) as u32, 1, 1),
            (block, 1, 1),
            0,
            &[
                Arg::P(out.ptr),
                Arg::P(table.ptr),
                Arg::P(ids_ptr),
                Arg::I(rows as i32),
                Arg::I(dim as i32),
            ],
        );
    }

    /// `ids` in a device buffer of their own (for `embedding_at`).
    pub fn upload_ids(&self, ids: &[u32]) -> Result<CudaSlice<u32>> {
        self.stream
            .clone_htod(ids)
            .map_err(|e| anyhow!("uploading {} ids: {e:?}", ids.len()))
    }

    /// The device address of a buffer from `upload_ids`.
    pub fn ids_ptr(&self, ids: &CudaSlice<u32>) -> u64 {
        ids.device_ptr(&self.stream).0
    }

    /// Whether programmatic dependent launch is on (`set_pdl`).
    pub fn pdl(&self) -> bool {
        self.pdl.get()
    }

    /// Programmatic dependent launch for the kernels that allow it (`programmatic`): their
    /// launch and first instructions overlap the previous kernel's tail. Only on sm_90 and later,
    /// where `griddepcontrol` exists; returns whether it is on.
    pub fn set_pdl(&self, on: bool) -> bool {
        self.pdl.set(on && self.compute_capability().0 >= 9);
        self.pdl.get()
    }

    /// `f` with programmatic dependent launch the other way from the setting, then the setting
    /// as it was, with the row label of that other way (" (pdl)" or " (no pdl)"): check-kernels
    /// and bench cover both. None before sm_90, where there is no other way.
    pub fn with_other_pdl<T>(&self, f: impl FnOnce() -> T) -> Option<(T, &'static str)> {
        let was = self.pdl();
        if self.set_pdl(!was) == was {
            return None;
        }
        let r = f();
        self.set_pdl(was);
        Some((r, if was { " (no pdl)" } else { " (pdl)" }))
    }

    pub fn attention_kernels(&self) -> AttnKernels {
        self.attn.get()
    }

    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.ctx.compute_capability().unwrap_or((0, 0))
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The most dynamic shared memory one block may opt into (227 KB on sm_90, 163 KB on
    /// sm_80, 99 KB on sm_86/89); 48 KB if the driver does not say.
    pub fn max_smem_optin(&self) -> u32 {
        self.ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_or(48 * 1024, |v| v as u32)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Keeps the first failure; later ops still run (and likely fail the same way) but the
    /// first cause is what gets reported.
    fn fail(&self, what: impl std::fmt::Display) {
        let mut e = self.error.borrow_mut();
        if e.is_none() {
            *e = Some(what.to_string());
        }
    }

    /// Records a failure of an op (the first one is what `sync` reports).
    pub fn fail_op(&self, what: impl std::fmt::Display) {
        self.fail(what)
    }

    /// Waits for the stream and reports the first error of any op since the last check.
    pub fn sync(&self) -> Result<()> {
        if let Err(e) = self.stream.synchronize() {
            self.fail(format!("CUDA stream failed: {e:?}"));
        }
        // Errors cudarc met where it cannot return them (freeing a buffer, destroying an event).
        if let Err(e) = self.ctx.check_err() {
            self.fail(format!(
                "CUDA failed while freeing or destroying an object: {e:?}"
            ));
        }
        match self.error.borrow_mut().take() {
            Some(e) => Err(anyhow!("{e}")),
            None => Ok(()),
        }
    }

    fn func(&self, name: &str) -> Option<CudaFunction> {
        if let Some(f) = self.funcs.borrow().get(name) {
            return Some(f.clone());
        }
        match self.module.load_function(name) {
            Ok(f) => {
                self.funcs.borrow_mut().insert(name.to_string(), f.clone());
                Some(f)
            }
            Err(e) => {
                self.fail(format!(
                    "kernel {name} is not in the embedded fatbin: {e:?}"
                ));
                None
            }
        }
    }

    /// Launches kernel `name` on the stream.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return;
        }
        let Some(f) = self.func(name) else { return };
        // A kernel's dynamic shared memory is capped at 48 KB less its static shared memory
        // unless it opts in: the sampler's 512-thread block (48 KB dynamic, 7 KB static) is
        // refused without it. So every size past what the kernel last opted into opts in.
        if smem > self.smem_opted.borrow().get(name).copied().unwrap_or(0) {
            use cudarc::driver::sys::CUfunction_attribute_enum as A;
            let attr = A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            if let Err(e) = f.set_attribute(attr, smem as i32) {
                self.fail(format!(
                    "{name}: opting into {smem} B of shared memory: {e:?}"
                ));
                return;
            }
            self.smem_opted.borrow_mut().insert(name.to_string(), smem);
        }
        let pdl = self.pdl.get() && programmatic(name);
        if let Err(e) = self.launch_func(&f, grid, block, smem, args, pdl) {
            self.fail(format!("launching {name}: {e}"));
        }
    }

    /// Launches `f` through cuLaunchKernelEx with programmatic stream serialization allowed: the
    /// kernel may start while the previous kernel in the stream finishes, and waits for it
    /// (`wait_for_prior_grids`) before it touches memory.
    fn launch_programmatic(
        &self,
        f: &CudaFunction,
        (grid, block, smem): ((u32, u32, u32), (u32, u32, u32), u32),
        args: &[Arg],
    ) -> std::result::Result<(), String> {
        use cudarc::driver::sys;
        use std::ffi::c_void;
        // cuLaunchKernelEx takes the address of each argument's value.
        let mut params: Vec<*mut c_void> = args
            .iter()
            .map(|a| match a {
                Arg::P(p) | Arg::U(p) => p as *const u64 as *mut c_void,
                Arg::I(x) => x as *const i32 as *mut c_void,
                Arg::L(x) => x as *const i64 as *mut c_void,
                Arg::F(x) => x as *const f32 as *mut c_void,
            })
            .collect();
        // SAFETY: an all-zero launch attribute is a valid value of the C union.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        // SAFETY: as in launch_func; `params` points into `args`, which outlives the call, and
        // the configuration names this backend's live stream.
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| format!("{e:?}"))
    }

    /// Launches `f` (programmatically where `pdl`), returning the launch error (a bad
    /// configuration, say) instead of keeping it.
    fn launch_func(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
        pdl: bool,
    ) -> std::result::Result<(), String> {
        if pdl {
            return self.launch_programmatic(f, (grid, block, smem), args);
        }
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(p) | Arg::U(p) => b.arg(p),
                Arg::I(x) => b.arg(x),
                Arg::L(x) => b.arg(x),
                Arg::F(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: smem,
        };
        // SAFETY: argument lists are written against each kernel's C signature (listed in
        // its .cu file), and every pointer is a live buffer checked for dtype and length.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    }

    /// A grid-stride elementwise launch over n values.
    fn launch_ew(&self, name: &str, n: usize, args: &[Arg]) {
        let blocks = (n as u64)
            .div_ceil(EW_BLOCK as u64)
            .min(self.sm_count as u64 * 8) as u32;
        self.launch(name, (blocks, 1, 1), (EW_BLOCK, 1, 1), 0, args);
    }

    /// Blocks of `block` threads of kernel `name` that fit on one SM at once (registers, shared
    /// memory, threads), at least 1.
    fn blocks_per_sm(&self, name: &str, block: u32) -> u32 {
        let key = (name.to_string(), block);
        if let Some(&n) = self.occupancy.borrow().get(&key) {
            return n;
        }
        let n = self
            .func(name)
            .and_then(|f| {
                f.occupancy_max_active_blocks_per_multiprocessor(block, 0, None)
                    .ok()
            })
            .unwrap_or(1)
            .max(1);
        self.occupancy.borrow_mut().insert(key, n);
        n
    }

    /// The elementwise kernels that move 16-byte packs of 8 values, EW_U packs per thread
    /// (cuda/elementwise.cu): a grid-stride loop over n/8 packs whose grid is what fits on the
    /// GPU at once, so that no block starts after the others have finished.
    fn launch_ew_vec(&self, name: &str, n: usize, args: &[Arg]) {
        let per_block = 8 * EW_U * EW_BLOCK as u64;
        let resident = self.sm_count as u64 * self.blocks_per_sm(name, EW_BLOCK) as u64;
        let blocks = (n as u64).div_ceil(per_block).clamp(1, resident) as u32;
        self.launch(name, (blocks, 1, 1), (EW_BLOCK, 1, 1), 0, args);
    }

    /// CTAs per row of the softmax-statistics kernels: about SME_PACKS_PER_THREAD packs a
    /// thread, and at least two waves of CTAs over the GPU when there are few rows.
    fn softmax_splits(&self, name: &str, rows: usize, vocab: usize) -> usize {
        let per_cta = SME_THREADS * SME_PACKS_PER_THREAD * 8;
        let resident =
            self.sm_count as usize * self.blocks_per_sm(name, SME_THREADS as u32) as usize;
        let by_size = vocab.div_ceil(per_cta);
        let by_fill = (2 * resident).div_ceil(rows.max(1));
        by_size
            .max(by_fill)
            .clamp(1, vocab.div_ceil(8 * 32).max(1))
            .min(1024)
    }

    /// Checks an operand: its dtype and that it holds at least `n` values.
    pub fn want(&self, op: &str, arg: &str, buf: &CudaBuf, dtype: Dtype, n: usize) -> bool {
        if buf.dtype() != dtype {
            self.fail(format!(
                "{op}: {arg} is {:?} but this op takes {dtype:?}",
                buf.dtype()
            ));
            return false;
        }
        if buf.len < n {
            self.fail(format!("{op}: {arg} holds {} values, needs {n}", buf.len));
            return false;
        }
        true
    }

    /// Adds to the allocation and copy counts (`Backend::traffic`).
    pub(crate) fn count(&self, f: impl FnOnce(&mut Traffic)) {
        let mut t = self.traffic.get();
        f(&mut t);
        self.traffic.set(t);
    }

    fn alloc_dtype(&self, n: usize, dtype: Dtype) -> Result<CudaBuf> {
        self.count(|t| t.allocs += 1);
        // A zero-byte cuMemAlloc fails; keep one element so every buffer has an address.
        let m = n.max(1);
        let mem = match dtype {
            Dtype::Bf16 => Mem::Bf16(
                self.stream
                    .alloc_zeros::<bf16>(m)
                    .map_err(|e| oom(n, dtype, e))?,
            ),
            Dtype::F32 => Mem::F32(
                self.stream
                    .alloc_zeros::<f32>(m)
                    .map_err(|e| oom(n, dtype, e))?,
            ),
        };
        let ptr = match &mem {
            Mem::Bf16(s) => s.device_ptr(&self.stream).0,
            Mem::F32(s) => s.device_ptr(&self.stream).0,
        };
        let bytes = m * width(dtype);
        let live = self.mem.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.mem.peak.fetch_max(live, Ordering::Relaxed);
        Ok(CudaBuf {
            mem,
            ptr,
            len: n,
            bytes,
            counter: self.mem.clone(),
        })
    }

    /// Uploads host values into storage of the given dtype.
    pub fn upload_as(&self, host: &[f32], dtype: Dtype) -> Result<CudaBuf> {
        let mut buf = self.alloc_dtype(host.len(), dtype)?;
        self.count(|t| t.to_device += 1);
        if host.is_empty() {
            return Ok(buf);
        }
        let r = match &mut buf.mem {
            Mem::Bf16(s) => {
                let h: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
                self.stream.memcpy_htod(&h, &mut s.slice_mut(..host.len()))
            }
            Mem::F32(s) => self
                .stream
                .memcpy_htod(host, &mut s.slice_mut(..host.len())),
        };
        r.map_err(|e| anyhow!("copying {} values to the GPU: {e:?}", host.len()))?;
        Ok(buf)
    }

    /// Uploads bf16 values as they are (weights from a bf16 checkpoint need no conversion).
    pub fn upload_bf16_raw(&self, host: &[bf16]) -> Result<CudaBuf> {
        let mut buf = self.alloc_dtype(host.len(), Dtype::Bf16)?;
        self.count(|t| t.to_device += 1);
        if let Mem::Bf16(s) = &mut buf.mem {
            if !host.is_empty() {
                self.stream
                    .memcpy_htod(host, &mut s.slice_mut(..host.len()))
                    .map_err(|e| anyhow!("copying {} values to the GPU: {e:?}", host.len()))?;
            }
        }
        Ok(buf)
    }

    /// Copies host u32 values into staging slot `slot` and returns its device address. Later
    /// copies into the same slot are ordered after the kernels that read it (one stream).
    fn stage_u32(&self, slot: Slot, host: &[u32]) -> Option<u64> {
        let mut staging = self.staging.borrow_mut();
        let cell = &mut staging[slot as usize];
        if cell.as_ref().is_none_or(|s| s.len() < host.len().max(1)) {
            self.count(|t| t.allocs += 1);
            match self.stream.alloc_zeros::<u32>(host.len().max(1024)) {
                Ok(s) => *cell = Some(s),
                Err(e) => {
                    self.fail(format!("staging {} values: {e:?}", host.len()));
                    return None;
                }
            }
        }
        let s = cell.as_mut().expect("allocated above");
        let p = s.device_ptr(&self.stream).0;
        if !host.is_empty() {
            self.count(|t| t.to_device += 1);
            let copied = match self.copy_pinned(p, host) {
                Some(r) => r,
                None => self
                    .stream
                    .memcpy_htod(host, &mut s.slice_mut(..host.len())),
            };
            if let Err(e) = copied {
                self.fail(format!("staging {} values: {e:?}", host.len()));
                return None;
            }
        }
        Some(p)
    }

    /// Queues the copy of `host` to device address `dst` through the next pinned slot (see
    /// `PinnedRing`); None where no page-locked memory could be had.
    fn copy_pinned(
        &self,
        dst: u64,
        host: &[u32],
    ) -> Option<std::result::Result<(), cudarc::driver::DriverError>> {
        let mut ring = self.pinned.borrow_mut();
        if ring.unavailable {
            return None;
        }
        let i = ring.next;
        ring.next = (i + 1) % PINNED_SLOTS;
        if ring.slots.get(i).is_none_or(|(b, _)| b.len() < host.len()) {
            if let Some((_, done)) = ring.slots.get(i) {
                // The copy from the slot being replaced must have run before its memory is freed.
                if let Err(e) = done.synchronize() {
                    return Some(Err(e));
                }
            }
            let cap = host.len().max(4096).next_power_of_two();
            self.count(|t| t.allocs += 1);
            // SAFETY: page-locked u32s, written below before any copy reads them.
            let made = unsafe { self.ctx.alloc_pinned::<u32>(cap) }
                .and_then(|b| Ok((b, self.ctx.new_event(None)?)));
            match made {
                Ok(slot) if i < ring.slots.len() => ring.slots[i] = slot,
                Ok(slot) => ring.slots.push(slot),
                Err(_) => {
                    ring.unavailable = true;
                    return None;
                }
            }
        }
        let (buf, done) = &mut ring.slots[i];
        let r = (|| {
            done.synchronize()?; // the copy that last read this slot has run
            let mem = &mut buf.as_mut_slice()?[..host.len()];
            mem.copy_from_slice(host);
            // SAFETY: `dst` is a live device buffer of at least host.len() u32s (stage_u32), and
            // `mem` stays untouched until `done`, recorded right after, has passed.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(dst, mem, self.stream.cu_stream())?
            };
            done.record(&self.stream)
        })();
        Some(r)
    }

    /// The device address of `host` in `slot`, copied only when it differs from what the slot
    /// last held.
    fn stage_cached(&self, slot: Slot, host: &[u32]) -> Option<u64> {
        let i = slot as usize;
        if self.staged.borrow()[i].as_deref() == Some(host) {
            if let Some(s) = self.staging.borrow()[i].as_ref() {
                return Some(s.device_ptr(&self.stream).0);
            }
        }
        // Forget the old values first: should this copy fail after the slot's buffer was
        // replaced, a later call with them must not find them "already there".
        self.staged.borrow_mut()[i] = None;
        let p = self.stage_u32(slot, host)?;
        self.staged.borrow_mut()[i] = Some(host.to_vec());
        Some(p)
    }

    /// Per-sequence key counts for decode attention.
    pub fn stage_kv_len(&self, host: &[u32]) -> Option<u64> {
        self.stage_cached(Slot::KvLen, host)
    }

    /// `starts` as the kernels take it: (pos0, null) for one start, (0, device address of the
    /// per-sequence starts) for a ragged cache.
    pub fn stage_starts(&self, op: &str, starts: Starts, batch: usize) -> Option<(i32, u64)> {
        match starts {
            Starts::Same(p) => Some((p as i32, 0)),
            Starts::Each(s) if s.len() == batch => Some((0, self.stage_cached(Slot::Starts, s)?)),
            Starts::Each(s) => {
                self.fail_op(format!("{op}: {} starts for a batch of {batch}", s.len()));
                None
            }
        }
    }

    /// Float scratch `i` of at least `n` values (kept between calls; contents undefined).
    pub fn scratch_f32(&self, i: usize, n: usize) -> Option<u64> {
        let mut sc = self.scratch.borrow_mut();
        if sc.len() <= i {
            sc.resize_with(i + 1, || None);
        }
        if sc[i].as_ref().is_none_or(|s| s.len() < n.max(1)) {
            // Free first: scratch can be large.
            if let Some(old) = sc[i].take() {
                self.mem.live.fetch_sub(old.len() * 4, Ordering::Relaxed);
            }
            self.count(|t| t.allocs += 1);
            match self.stream.alloc_zeros::<f32>(n.max(1)) {
                Ok(s) => {
                    let live = self.mem.live.fetch_add(s.len() * 4, Ordering::Relaxed);
                    self.mem
                        .peak
                        .fetch_max(live + s.len() * 4, Ordering::Relaxed);
                    sc[i] = Some(s);
                }
                Err(e) => {
                    self.fail(format!("allocating {n} floats of scratch: {e:?}"));
                    return None;
                }
            }
        }
        let p = sc[i]
            .as_ref()
            .expect("allocated above")
            .device_ptr(&self.stream)
            .0;
        Some(p)
    }

    /// Sets `n` values at device address `ptr` of `dtype` to zero.
    fn memset_zero(&self, ptr: u64, bytes: usize) {
        if bytes == 0 {
            return;
        }
        // SAFETY: ptr addresses a live allocation of at least `bytes` bytes on this context.
        let r = unsafe {
            cudarc::driver::result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream())
        };
        if let Err(e) = r {
            self.fail(format!("memset: {e:?}"));
        }
    }

    /// Copies `bytes` between device addresses, in stream order.
    fn memcpy_dtod(&self, dst: u64, src: u64, bytes: usize) {
        if bytes == 0 {
            return;
        }
        // SAFETY: callers check that both ranges lie inside live allocations.
        let r = unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        };
        if let Err(e) = r {
            self.fail(format!("device copy of {bytes} bytes: {e:?}"));
        }
    }

    /// C = alpha·op(A)·op(B) + beta·C in cuBLAS's column-major terms, fp32 compute.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, a_t, lda): (u64, Dtype, usize),
        (b, b_t, ldb): (u64, Dtype, usize),
        beta: f32,
        (c, c_t, ldc): (u64, Dtype, usize),
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let alpha = 1.0f32;
        // SAFETY: the callers check every operand's dtype and length against m, n, k; alpha
        // and beta are host f32, matching the default pointer mode and COMPUTE_32F.
        let r = unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_op(ta),
                blas_op(tb),
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                a as *const _,
                a_t.blas(),
                lda as i32,
                b as *const _,
                b_t.blas(),
                ldb as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                c_t.blas(),
                ldc as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if let Err(e) = r {
            self.fail(format!("cuBLAS GemmEx (m {m}, n {n}, k {k}): {e:?}"));
        }
    }

    /// `count` GEMMs C_i = op(A_i)·op(B_i) + beta·C_i in one cuBLAS strided-batched call, where
    /// X_i starts `stride` elements after X_(i-1) (0 repeats an operand); column-major terms and
    /// fp32 compute, as `gemm`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_batched(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, a_t, lda, sa): (u64, Dtype, usize, usize),
        (b, b_t, ldb, sb): (u64, Dtype, usize, usize),
        beta: f32,
        (c, c_t, ldc, sc): (u64, Dtype, usize, usize),
        count: usize,
    ) {
        if m == 0 || n == 0 || count == 0 {
            return;
        }
        let alpha = 1.0f32;
        // SAFETY: the caller (cuda_attention_unfused) checks every operand against the shape
        // the whole batch spans; alpha and beta are host f32, as in `gemm`.
        let r = unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                blas_op(ta),
                blas_op(tb),
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                a as *const _,
                a_t.blas(),
                lda as i32,
                sa as i64,
                b as *const _,
                b_t.blas(),
                ldb as i32,
                sb as i64,
                &beta as *const f32 as *const _,
                c as *mut _,
                c_t.blas(),
                ldc as i32,
                sc as i64,
                count as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if let Err(e) = r {
            self.fail(format!(
                "cuBLAS GemmStridedBatchedEx (m {m}, n {n}, k {k}, batch {count}): {e:?}"
            ));
        }
    }

    /// Downloads any buffer as f32 (bf16 widened).
    fn download_f32(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        self.count(|t| t.to_host += 1);
        let out = match &buf.mem {
            Mem::Bf16(s) => self
                .stream
                .clone_dtoh(&s.slice(..buf.len))
                .map(|v| v.into_iter().map(f32::from).collect()),
            Mem::F32(s) => self.stream.clone_dtoh(&s.slice(..buf.len)),
        };
        let out = out.map_err(|e| anyhow!("copying {} values from the GPU: {e:?}", buf.len));
        self.sync()?;
        out
    }
}

/// Bytes per stored value.
pub fn width(d: Dtype) -> usize {
    match d {
        Dtype::Bf16 => 2,
        Dtype::F32 => 4,
    }
}

fn oom(n: usize, dtype: Dtype, e: impl std::fmt::Debug) -> anyhow::Error {
    let bytes = n * if dtype == Dtype::Bf16 { 2 } else { 4 };
    anyhow!(
        "cannot allocate {:.1} MiB on the GPU ({n} {dtype:?} values): {e:?}",
        bytes as f64 / (1 << 20) as f64
    )
}

/// The `-gencode` targets the embedded fatbin was built for.
pub fn kernel_targets() -> &'static str {
    option_env!("EMPO_CUDA_TARGETS").unwrap_or("none")
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Host = CudaHost;

    fn name(&self) -> String {
        let (maj, min) = self.compute_capability();
        format!(
            "cuda ({}, sm_{maj}{min}, bf16 storage, fp32 accumulation)",
            self.device_name()
        )
    }

    fn attention_variants(&self, head_dim: usize) -> Vec<&'static str> {
        // What runs now at this head_dim first (wgmma exists at 128 only; elsewhere its setting
        // runs the mma.sync kernels), then the others.
        let now = match self.attn.get() {
            AttnKernels::Wgmma if head_dim != 128 => AttnKernels::Mma,
            k => k,
        };
        let mut v = vec![now.name()];
        for k in [AttnKernels::Wgmma, AttnKernels::Mma, AttnKernels::Unfused] {
            if k != now && (k != AttnKernels::Wgmma || (self.has_wgmma() && head_dim == 128)) {
                v.push(k.name());
            }
        }
        v
    }

    fn attention_variant(&self) -> Option<&'static str> {
        Some(self.attn.get().name())
    }

    fn set_attention_variant(&self, variant: &str) -> Result<()> {
        let k = match variant {
            "mma" => AttnKernels::Mma,
            "unfused" => AttnKernels::Unfused,
            "wgmma" if self.has_wgmma() => AttnKernels::Wgmma,
            "wgmma" => {
                let (maj, min) = self.compute_capability();
                bail!(
                    "the wgmma attention kernels need compute capability 9.0 and sm_90a in the build; this is sm_{maj}{min} with targets {}",
                    kernel_targets()
                )
            }
            other => bail!("unknown attention kernels {other:?} (expected mma, unfused or wgmma)"),
        };
        self.attn.set(k);
        Ok(())
    }

    fn alloc(&self, n: usize) -> Result<CudaBuf> {
        self.alloc_dtype(n, Dtype::Bf16)
    }
    fn alloc_f32(&self, n: usize) -> Result<CudaBuf> {
        self.alloc_dtype(n, Dtype::F32)
    }
    fn upload(&self, host: &[f32]) -> Result<CudaBuf> {
        self.upload_as(host, Dtype::Bf16)
    }
    fn upload_f32(&self, host: &[f32]) -> Result<CudaBuf> {
        self.upload_as(host, Dtype::F32)
    }
    fn upload_bf16(&self, host: &[bf16]) -> Result<CudaBuf> {
        self.upload_bf16_raw(host)
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        self.download_f32(buf)
    }
    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }
    fn alloc_host(&self, n: usize) -> Result<CudaHost> {
        self.count(|t| t.allocs += 1);
        // Not write-combined (cudarc's alloc_pinned): checkpoints read these values back on the
        // host, and reads of write-combined memory are uncached.
        // SAFETY: every value is written (zeroed) below before anything reads it.
        let pinned =
            unsafe { self.ctx.alloc_pinned_with_flags::<f32>(n.max(1), 0) }.and_then(|mut p| {
                p.as_mut_slice()?.fill(0.0);
                Ok(p)
            });
        match pinned {
            Ok(mem) if n > 0 => Ok(CudaHost::Pinned(PinnedHost {
                mem,
                stream: self.stream.clone(),
            })),
            Ok(_) => Ok(CudaHost::Pageable(Vec::new())),
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    eprintln!(
                        "warning: no page-locked host memory ({e:?}); offloaded values are copied \
                         through pageable memory, at a fraction of the bus's speed"
                    )
                });
                Ok(CudaHost::Pageable(vec![0.0; n]))
            }
        }
    }
    fn copy_to_device(&self, dst: &mut CudaBuf, src: &CudaHost) {
        self.count(|t| t.to_device += 1);
        let n = src.len();
        let Mem::F32(s) = &mut dst.mem else {
            self.fail("copy_to_device: the destination must be f32 storage");
            return;
        };
        if dst.len != n {
            self.fail(format!("copy_to_device: {n} values into {}", dst.len));
            return;
        }
        if n == 0 {
            return;
        }
        let r = match src {
            CudaHost::Pinned(p) => self.stream.memcpy_htod(&p.mem, &mut s.slice_mut(..n)),
            CudaHost::Pageable(v) => self.stream.memcpy_htod(v, &mut s.slice_mut(..n)),
        };
        if let Err(e) = r {
            self.fail(format!("copying {n} values to the GPU: {e:?}"));
        }
    }
    fn copy_to_host(&self, dst: &mut CudaHost, src: &CudaBuf) {
        self.count(|t| t.to_host += 1);
        let n = dst.len();
        let Mem::F32(s) = &src.mem else {
            self.fail("copy_to_host: the source must be f32 storage");
            return;
        };
        if src.len != n {
            self.fail(format!("copy_to_host: {} values into {n}", src.len));
            return;
        }
        if n == 0 {
            return;
        }
        let r = match dst {
            CudaHost::Pinned(p) => self.stream.memcpy_dtoh(&s.slice(..n), &mut p.mem),
            CudaHost::Pageable(v) => self.stream.memcpy_dtoh(&s.slice(..n), v),
        };
        if let Err(e) = r {
            self.fail(format!("copying {n} values from the GPU: {e:?}"));
        }
    }
    fn host_values(&self, h: &CudaHost) -> Result<Vec<f32>> {
        self.sync()?;
        Ok(match h {
            CudaHost::Pinned(p) => p
                .mem
                .as_slice()
                .map_err(|e| anyhow!("reading page-locked memory: {e:?}"))?
                .to_vec(),
            CudaHost::Pageable(v) => v.clone(),
        })
    }
    fn set_host_values(&self, h: &mut CudaHost, values: &[f32]) -> Result<()> {
        if h.len() != values.len() {
            bail!("{} values for host memory of {}", values.len(), h.len());
        }
        self.sync()?;
        match h {
            CudaHost::Pinned(p) => p
                .mem
                .as_mut_slice()
                .map_err(|e| anyhow!("writing page-locked memory: {e:?}"))?
                .copy_from_slice(values),
            CudaHost::Pageable(v) => v.copy_from_slice(values),
        }
        Ok(())
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }
    fn sync(&self) -> Result<()> {
        CudaBackend::sync(self)
    }
    fn sample(
        &self,
        logits: &CudaBuf,
        rows: usize,
        vocab: usize,
        p: &crate::sampling::SamplingParams,
        keys: &[crate::sampling::DrawKey],
    ) -> Result<Vec<u32>> {
        super::cuda_rl::sample(self, logits, rows, vocab, p, keys)
    }
    fn grad_sumsq(&self, grads: &[&CudaBuf]) -> Result<f64> {
        super::cuda_rl::grad_sumsq(self, grads)
    }
    fn optimizer_step(
        &self,
        params: &mut [&mut CudaBuf],
        grads: &[&CudaBuf],
        moments: Option<super::MomentLists<'_, '_, CudaBuf>>,
        h: &super::OptimizerStep,
    ) -> Result<f64> {
        super::cuda_rl::optimizer_step(self, params, grads, moments, h)
    }
    fn memory(&self) -> Option<(usize, usize)> {
        Some((
            self.mem.live.load(Ordering::Relaxed),
            self.mem.peak.load(Ordering::Relaxed),
        ))
    }
    fn device_memory(&self) -> Option<(usize, usize)> {
        self.ctx.mem_get_info().ok()
    }
    fn storage_bytes(&self) -> usize {
        2
    }
    fn reset_peak_memory(&self) {
        self.mem
            .peak
            .store(self.mem.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    fn release_scratch(&self) {
        for s in self.scratch.borrow_mut().drain(..).flatten() {
            self.mem.live.fetch_sub(s.len() * 4, Ordering::Relaxed);
        }
    }

    fn zero(&self, buf: &mut CudaBuf) {
        self.memset_zero(buf.ptr, buf.len * width(buf.dtype()));
    }

    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        let n = src.len;
        if dst.len < n {
            self.fail(format!(
                "copy: destination holds {} values, source {n}",
                dst.len
            ));
            return;
        }
        if dst.dtype() == src.dtype() {
            self.memcpy_dtod(dst.ptr, src.ptr, n * width(src.dtype()));
        } else {
            let name = format!("convert_{}_{}", dst.dtype().suffix(), src.dtype().suffix());
            self.launch_ew_vec(
                &name,
                n,
                &[Arg::P(dst.ptr), Arg::P(src.ptr), Arg::L(n as i64)],
            );
        }
    }

    fn copy_range(
        &self,
        dst: &mut CudaBuf,
        dst_off: usize,
        src: &CudaBuf,
        src_off: usize,
        n: usize,
    ) {
        if dst_off + n > dst.len || src_off + n > src.len {
            self.fail(format!(
                "copy_range: [{dst_off}, +{n}) of {} from [{src_off}, +{n}) of {}",
                dst.len, src.len
            ));
            return;
        }
        let (dw, sw) = (width(dst.dtype()), width(src.dtype()));
        let (d, s) = (
            dst.ptr + (dst_off * dw) as u64,
            src.ptr + (src_off * sw) as u64,
        );
        if dst.dtype() == src.dtype() {
            self.memcpy_dtod(d, s, n * dw);
        } else {
            let name = format!("convert_{}_{}", dst.dtype().suffix(), src.dtype().suffix());
            self.launch_ew_vec(&name, n, &[Arg::P(d), Arg::P(s), Arg::L(n as i64)]);
        }
    }

    fn add(&self, y: &mut CudaBuf, x: &CudaBuf) {
        if y.len != x.len {
            self.fail(format!("add: {} values += {} values", y.len, x.len));
            return;
        }
        let name = format!("add_{}_{}", y.dtype().suffix(), x.dtype().suffix());
        if name == "add_bf16_f32" {
            self.fail("add: a bf16 buffer cannot accumulate an f32 one");
            return;
        }
        self.launch_ew_vec(
            &name,
            y.len,
            &[Arg::P(y.ptr), Arg::P(x.ptr), Arg::L(y.len as i64)],
        );
    }

    fn axpy(&self, y: &mut CudaBuf, alpha: f32, x: &CudaBuf) {
        if y.len != x.len {
            self.fail(format!("axpy: {} values += a·{} values", y.len, x.len));
            return;
        }
        let name = format!("axpy_{}_{}", y.dtype().suffix(), x.dtype().suffix());
        self.launch_ew_vec(
            &name,
            y.len,
            &[
                Arg::P(y.ptr),
                Arg::F(alpha),
                Arg::P(x.ptr),
                Arg::L(y.len as i64),
            ],
        );
    }

    fn sum_squares(&self, x: &CudaBuf) -> Result<f64> {
        self.count(|t| {
            t.allocs += 1;
            t.to_host += 1;
        });
        let mut acc = self
            .stream
            .alloc_zeros::<f64>(1)
            .map_err(|e| anyhow!("allocating a reduction slot: {e:?}"))?;
        let acc_ptr = acc.device_ptr(&self.stream).0;
        let name = format!("sum_squares_{}", x.dtype().suffix());
        self.launch_ew(
            &name,
            x.len,
            &[Arg::P(acc_ptr), Arg::P(x.ptr), Arg::L(x.len as i64)],
        );
        let host = self
            .stream
            .clone_dtoh(&acc.slice_mut(..))
            .map_err(|e| anyhow!("reading a reduction: {e:?}"))?;
        self.sync()?;
        Ok(host[0])
    }

    fn adamw(&self, p: &mut CudaBuf, g: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, h: &AdamWStep) {
        let n = p.len;
        let op = "adamw";
        if !(self.want(op, "grad", g, Dtype::F32, n)
            && self.want(op, "m", m, Dtype::F32, n)
            && self.want(op, "v", v, Dtype::F32, n))
        {
            return;
        }
        // The same f64 bias corrections as cpu::adamw, so both round alike.
        let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
        let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
        let name = format!("adamw_{}", p.dtype().suffix());
        self.launch_ew(
            &name,
            n,
            &[
                Arg::P(p.ptr),
                Arg::P(g.ptr),
                Arg::P(m.ptr),
                Arg::P(v.ptr),
                Arg::L(n as i64),
                Arg::F(1.0 - h.lr * h.weight_decay),
                Arg::F(h.beta1),
                Arg::F(h.beta2),
                Arg::F(h.eps),
                Arg::F((h.lr as f64 / bc1) as f32),
                Arg::F(bc2.sqrt() as f32),
                Arg::F(h.grad_scale),
            ],
        );
    }

    fn embedding(&self, out: &mut CudaBuf, table: &CudaBuf, ids: &[u32], dim: usize) {
        let op = "embedding";
        if !(self.want(op, "out", out, Dtype::Bf16, ids.len() * dim)
            && self.want(op, "table", table, Dtype::Bf16, dim))
        {
            return;
        }
        if let Some(&bad) = ids.iter().find(|&&t| (t as usize + 1) * dim > table.len) {
            self.fail(format!(
                "embedding: row {bad} is outside a table of {} rows",
                table.len / dim.max(1)
            ));
            return;
        }
        let Some(ids_ptr) = self.stage_u32(Slot::Ids, ids) else {
            return;
        };
        self.embedding_at(out, table, ids_ptr, ids.len(), dim);
    }

    fn embedding_bwd(&self, dtable: &mut CudaBuf, dout: &CudaBuf, ids: &[u32], dim: usize) {
        let op = "embedding_bwd";
        if !(self.want(op, "dtable", dtable, Dtype::F32, dim)
            && self.want(op, "dout", dout, Dtype::Bf16, ids.len() * dim))
        {
            return;
        }
        if let Some(&bad) = ids.iter().find(|&&t| (t as usize + 1) * dim > dtable.len) {
            self.fail(format!("embedding_bwd: row {bad} is outside the table"));
            return;
        }
        let Some(ids_ptr) = self.stage_u32(Slot::Ids, ids) else {
            return;
        };
        self.launch(
            "embedding_bwd",
            (ids.len() as u32, 1, 1),
            (256, 1, 1),
            0,
            &[
                Arg::P(dtable.ptr),
                Arg::P(dout.ptr),
                Arg::P(ids_ptr),
                Arg::I(dim as i32),
            ],
        );
    }

    fn matmul(
        &self,
        out: &mut CudaBuf,
        a: &CudaBuf,
        w: &CudaBuf,
        bias: Option<&CudaBuf>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        let op = "matmul";
        if !(self.want(op, "out", out, Dtype::Bf16, m * n)
            && self.want(op, "a", a, Dtype::Bf16, m * k)
            && self.want(op, "w", w, Dtype::Bf16, n * k))
        {
            return;
        }
        let beta = match bias {
            Some(b) => {
                if !self.want(op, "bias", b, Dtype::Bf16, n) {
                    return;
                }
                self.launch_ew(
                    "bias_broadcast",
                    m * n,
                    &[
                        Arg::P(out.ptr),
                        Arg::P(b.ptr),
                        Arg::L(m as i64),
                        Arg::I(n as i32),
                    ],
                );
                1.0
            }
            None => 0.0,
        };
        // Row-major out[m,n] = a[m,k]·w[n,k]ᵀ is column-major outᵀ[n,m] = w·aᵀ, where w's
        // storage read column-major is wᵀ[k,n] (so op T) and a's is aᵀ[k,m] (op N).
        self.gemm(
            (true, false),
            (n, m, k),
            (w.ptr, Dtype::Bf16, k),
            (a.ptr, Dtype::Bf16, k),
            beta,
            (out.ptr, Dtype::Bf16, n),
        );
    }

    fn matmul_bwd(
        &self,
        da: Option<&mut CudaBuf>,
        dw: Option<&mut CudaBuf>,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        a: &CudaBuf,
        w: &CudaBuf,
        m: usize,
        k: usize,
        n: usize,
    ) {
        let op = "matmul_bwd";
        if !(self.want(op, "dout", dout, Dtype::Bf16, m * n)
            && self.want(op, "a", a, Dtype::Bf16, m * k)
            && self.want(op, "w", w, Dtype::Bf16, n * k))
        {
            return;
        }
        if let Some(da) = da {
            if !self.want(op, "da", da, Dtype::Bf16, m * k) {
                return;
            }
            // da[m,k] += dout[m,n]·w[n,k]: column-major daᵀ[k,m] = wᵀ[k,n]·doutᵀ[n,m].
            self.gemm(
                (false, false),
                (k, m, n),
                (w.ptr, Dtype::Bf16, k),
                (dout.ptr, Dtype::Bf16, n),
                1.0,
                (da.ptr, Dtype::Bf16, k),
            );
        }
        if let Some(dw) = dw {
            if !self.want(op, "dw", dw, Dtype::F32, n * k) {
                return;
            }
            // dw[n,k] += doutᵀ[n,m]·a[m,k]: column-major dwᵀ[k,n] = aᵀ[k,m]·dout[m,n], where
            // dout's storage read column-major is doutᵀ[n,m] (so op T).
            self.gemm(
                (false, true),
                (k, n, m),
                (a.ptr, Dtype::Bf16, k),
                (dout.ptr, Dtype::Bf16, n),
                1.0,
                (dw.ptr, Dtype::F32, k),
            );
        }
        if let Some(db) = dbias {
            if !self.want(op, "dbias", db, Dtype::F32, n) {
                return;
            }
            self.launch(
                "bias_bwd",
                (n.div_ceil(32) as u32, 1, 1),
                (32, 8, 1),
                0,
                &[
                    Arg::P(db.ptr),
                    Arg::P(dout.ptr),
                    Arg::L(m as i64),
                    Arg::I(n as i32),
                ],
            );
        }
    }

    fn rmsnorm(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        let op = "rmsnorm";
        if !(self.want(op, "out", out, Dtype::Bf16, rows * dim)
            && self.want(op, "rstd", rstd, Dtype::F32, rows)
            && self.want(op, "x", x, Dtype::Bf16, rows * dim)
            && self.want(op, "w", w, Dtype::Bf16, dim))
        {
            return;
        }
        self.launch(
            "rmsnorm_fwd",
            (rows as u32, 1, 1),
            (row_block(dim, RMS_VPT), 1, 1),
            0,
            &[
                Arg::P(out.ptr),
                Arg::P(rstd.ptr),
                Arg::P(x.ptr),
                Arg::P(w.ptr),
                Arg::I(dim as i32),
                Arg::F(eps),
            ],
        );
    }

    fn rmsnorm_bwd(
        &self,
        dx: &mut CudaBuf,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        rows: usize,
        dim: usize,
    ) {
        let op = "rmsnorm_bwd";
        if !(self.want(op, "dx", dx, Dtype::Bf16, rows * dim)
            && self.want(op, "dw", dw, Dtype::F32, dim)
            && self.want(op, "dout", dout, Dtype::Bf16, rows * dim)
            && self.want(op, "x", x, Dtype::Bf16, rows * dim)
            && self.want(op, "w", w, Dtype::Bf16, dim)
            && self.want(op, "rstd", rstd, Dtype::F32, rows))
        {
            return;
        }
        // Each block walks rows with a stride of the grid and adds its share of dw once, so the
        // grid is what fits on the GPU at once, split evenly: ⌈rows / resident⌉ rows per block.
        // Longer rows than its launch bound allows take the kernel's scalar path.
        let block = row_block(dim, RMS_VPT).min(RMS_BWD_MAX_THREADS);
        let resident = (self.sm_count * self.blocks_per_sm("rmsnorm_bwd", block)) as usize;
        let blocks = rows.div_ceil(rows.div_ceil(resident.max(1)).max(1));
        self.launch(
            "rmsnorm_bwd",
            (blocks as u32, 1, 1),
            (block, 1, 1),
            0,
            &[
                Arg::P(dx.ptr),
                Arg::P(dw.ptr),
                Arg::P(dout.ptr),
                Arg::P(x.ptr),
                Arg::P(w.ptr),
                Arg::P(rstd.ptr),
                Arg::L(rows as i64),
                Arg::I(dim as i32),
            ],
        );
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        starts: Starts,
        theta: f32,
        inverse: bool,
    ) {
        let rows = batch * seq;
        if !self.want("rope", "x", x, Dtype::Bf16, rows * heads * head_dim) {
            return;
        }
        let Some((pos0, starts_p)) = self.stage_starts("rope", starts, batch) else {
            return;
        };
        // The packed path (cuda/rope.cu): a unit per (row, ROPE_HG heads, 8 pairs), walked by
        // the blocks that fit at once, each thread loading its next unit while it rotates the
        // current one. The kernel is a grid-stride loop, so this only sizes the grid.
        let blocks = if (head_dim / 2).is_multiple_of(8) && x.ptr.is_multiple_of(16) {
            let units = rows * heads.div_ceil(ROPE_HG) * (head_dim / 16);
            let resident = self.sm_count as usize * self.blocks_per_sm("rope", 256) as usize;
            units.div_ceil(256).clamp(1, resident)
        } else {
            (rows * heads * (head_dim / 2)).div_ceil(256)
        };
        self.launch(
            "rope",
            (blocks.min(i32::MAX as usize) as u32, 1, 1),
            (256, 1, 1),
            // The inverse frequencies, computed once per block.
            (head_dim / 2 * 4) as u32,
            &[
                Arg::P(x.ptr),
                Arg::L(rows as i64),
                Arg::I(seq as i32),
                Arg::I(heads as i32),
                Arg::I(head_dim as i32),
                Arg::I(pos0),
                Arg::P(starts_p),
                Arg::F(theta),
                Arg::I(inverse as i32),
            ],
        );
    }

    fn attention(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        s: AttnShape,
    ) {
        crate::backend::cuda_attention::forward(self, out, lse, q, k, v, s);
    }

    fn attention_decode(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        s: AttnShape,
        kv_len: &[u32],
    ) {
        crate::backend::cuda_attention::forward_ragged(self, out, lse, q, k, v, s, kv_len);
    }

    fn attention_bwd(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        s: AttnShape,
    ) {
        crate::backend::cuda_attention::backward(self, dq, dk, dv, dout, out, lse, q, k, v, s);
    }

    fn kv_write(
        &self,
        cache: &mut CudaBuf,
        new: &CudaBuf,
        batch: usize,
        cap: usize,
        starts: Starts,
        tq: usize,
        row: usize,
    ) {
        crate::backend::cuda_attention::kv_write(self, cache, new, batch, cap, starts, tq, row);
    }

    fn swiglu(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf) {
        let n = gate.len;
        let op = "swiglu";
        if !(self.want(op, "out", out, Dtype::Bf16, n)
            && self.want(op, "gate", gate, Dtype::Bf16, n)
            && self.want(op, "up", up, Dtype::Bf16, n))
        {
            return;
        }
        self.launch_ew_vec(
            "swiglu_fwd",
            n,
            &[
                Arg::P(out.ptr),
                Arg::P(gate.ptr),
                Arg::P(up.ptr),
                Arg::L(n as i64),
            ],
        );
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
        dout: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
    ) {
        let n = gate.len;
        let op = "swiglu_bwd";
        if !(self.want(op, "dgate", dgate, Dtype::Bf16, n)
            && self.want(op, "dup", dup, Dtype::Bf16, n)
            && self.want(op, "dout", dout, Dtype::Bf16, n)
            && self.want(op, "up", up, Dtype::Bf16, n))
        {
            return;
        }
        self.launch_ew_vec(
            "swiglu_bwd",
            n,
            &[
                Arg::P(dgate.ptr),
                Arg::P(dup.ptr),
                Arg::P(dout.ptr),
                Arg::P(gate.ptr),
                Arg::P(up.ptr),
                Arg::L(n as i64),
            ],
        );
    }

    fn softmax_stats_into(
        &self,
        stats: &mut CudaBuf,
        logits: &CudaBuf,
        rows: usize,
        vocab: usize,
        targets: &[u32],
        temperature: f32,
    ) -> Result<()> {
        let op = "softmax_stats";
        super::check_stats_args(logits.len, rows, vocab, targets)?;
        if !(self.want(op, "logits", logits, Dtype::Bf16, rows * vocab)
            && self.want(op, "stats", stats, Dtype::F32, 3 * rows))
        {
            return self.sync();
        }
        if rows == 0 {
            return Ok(());
        }
        let name = "softmax_stats_fwd";
        let splits = self.softmax_splits(name, rows, vocab);
        let (Some(t), Some(partial), Some(arrived)) = (
            self.stage_u32(Slot::Ids, targets),
            self.scratch_f32(slot::SME_PARTIAL, 3 * splits * rows),
            // Zeroed when allocated; each launch leaves its counters at zero again.
            self.scratch_f32(slot::SME_ARRIVED, rows),
        ) else {
            return self.sync();
        };
        // Rows go on grid y, which stops at 65535: longer batches take several launches.
        for r0 in (0..rows).step_by(MAX_GRID_Y) {
            let (n, r) = (MAX_GRID_Y.min(rows - r0), r0 as u64);
            let args = [
                Arg::P(stats.ptr + 12 * r),
                Arg::P(partial + 12 * splits as u64 * r),
                Arg::P(arrived + 4 * r),
                Arg::P(logits.ptr + 2 * vocab as u64 * r),
                Arg::P(t + 4 * r),
                Arg::I(vocab as i32),
                Arg::F(temperature),
            ];
            let grid = (splits as u32, n as u32, 1);
            self.launch(name, grid, (SME_THREADS as u32, 1, 1), 0, &args);
        }
        Ok(())
    }

    fn softmax_stats_bwd(
        &self,
        dlogits: &mut CudaBuf,
        logits: &CudaBuf,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    ) {
        let StatsLoss {
            targets,
            temperature,
            ..
        } = *loss;
        // Without saved statistics: the forward into scratch, then the saved-stats backward
        // (two reads of the logits and one write).
        let mut stats = match self.alloc_f32(3 * rows) {
            Ok(s) => s,
            Err(e) => return self.fail(format!("softmax_stats_bwd: {e:#}")),
        };
        if let Err(e) =
            self.softmax_stats_into(&mut stats, logits, rows, vocab, targets, temperature)
        {
            return self.fail(format!("{e:#}"));
        }
        self.softmax_stats_bwd_saved(dlogits, logits, &stats, rows, vocab, loss);
    }

    fn softmax_stats_bwd_saved(
        &self,
        dlogits: &mut CudaBuf,
        logits: &CudaBuf,
        stats: &CudaBuf,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    ) {
        if self.want(
            "softmax_stats_bwd",
            "dlogits",
            dlogits,
            Dtype::Bf16,
            rows * vocab,
        ) {
            self.stats_bwd_saved_to(dlogits.ptr, logits, stats, rows, vocab, loss);
        }
    }

    fn softmax_stats_bwd_saved_in_place(
        &self,
        logits: &mut CudaBuf,
        stats: &CudaBuf,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    ) {
        // The kernel reads each pack of logits before the same thread writes its gradient there.
        self.stats_bwd_saved_to(logits.ptr, logits, stats, rows, vocab, loss);
    }
}

impl CudaBackend {
    /// softmax_stats_bwd_saved writing dlogits at `dst`: a checked bf16 [rows, vocab] buffer,
    /// or the logits' own address.
    fn stats_bwd_saved_to(
        &self,
        dst: u64,
        logits: &CudaBuf,
        stats: &CudaBuf,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    ) {
        let StatsLoss {
            targets,
            temperature,
            a,
            b,
        } = *loss;
        let op = "softmax_stats_bwd";
        if !(self.want(op, "logits", logits, Dtype::Bf16, rows * vocab)
            && self.want(op, "stats", stats, Dtype::F32, 3 * rows))
        {
            return;
        }
        if targets.len() != rows || a.len() != rows || b.len() != rows {
            self.fail(format!(
                "{op}: {rows} rows but {} targets, {} a, {} b",
                targets.len(),
                a.len(),
                b.len()
            ));
            return;
        }
        if let Some(t) = targets
            .iter()
            .find(|&&t| t != NO_TARGET && t as usize >= vocab)
        {
            self.fail(format!(
                "{op}: target {t} is outside the vocabulary of {vocab}"
            ));
            return;
        }
        if rows == 0 {
            return;
        }
        // One host-to-device copy for the three per-row inputs, not three.
        let mut rowwise = Vec::with_capacity(3 * rows);
        rowwise.extend_from_slice(targets);
        rowwise.extend(a.iter().chain(b).map(|x| x.to_bits()));
        let Some(t) = self.stage_u32(Slot::Ids, &rowwise) else {
            return;
        };
        let (pa, pb) = (t + 4 * rows as u64, t + 8 * rows as u64);
        let name = "softmax_stats_bwd_saved";
        let splits = self.softmax_splits(name, rows, vocab);
        for r0 in (0..rows).step_by(MAX_GRID_Y) {
            let (n, r) = (MAX_GRID_Y.min(rows - r0), r0 as u64);
            let row_bytes = 2 * vocab as u64 * r;
            let args = [
                Arg::P(dst + row_bytes),
                Arg::P(logits.ptr + row_bytes),
                Arg::P(stats.ptr + 12 * r),
                Arg::P(t + 4 * r),
                Arg::P(pa + 4 * r),
                Arg::P(pb + 4 * r),
                Arg::I(vocab as i32),
                Arg::F(temperature),
            ];
            let grid = (splits as u32, n as u32, 1);
            self.launch(name, grid, (SME_THREADS as u32, 1, 1), 0, &args);
        }
    }
}
