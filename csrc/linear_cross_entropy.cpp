// Linear + cross-entropy without materializing the logits: cross_entropy(input @ W.T + b, target).
//
// Rows are processed in chunks of chunk_size: the chunk's logits (chunk x V) by one GEMM, the
// fused cross-entropy ops on them (forward: the loss; backward: the logits' gradient in one
// pass), then the chunk's input gradient (dlogits @ W) and its share of the weight and bias
// gradients (accumulated across chunks), and the buffer is reused by the next chunk. The logits'
// gradient is written over the logits (cross_entropy_bwd_inplace), so the peak extra memory is
// one chunk x V buffer besides the V x H weight gradient.
//
// The loop is device-neutral: ATen GEMMs plus torch_ext's cross-entropy ops called through the
// dispatcher, so the same function serves every device whose cross-entropy kernels exist. It
// is registered for CPU here (CUDA registers it with its kernels).
//
// linear_cross_entropy_fwd can also return the gradients for grad_output = 1 (grad_mask), formed
// in the same pass while each chunk's logits exist: the backward then only scales them, instead
// of recomputing the logits (the Python layer does that in eager mode for reductions mean/sum).
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "allocation.h"
#include "checks.h"
#include "cpu/cross_entropy_targets.h"
#include "cpu/runtime/gemm.h"
#include "cpu/runtime/kernel_table.h"
#include "op_handles.h"
#ifdef TORCH_EXT_WITH_CUDA
#include "cuda/cross_entropy_targets.h"
#include "cuda/cublaslt_gemm.h"
#endif
#include "loss.h"
#include "loss_checks.h"
#include "matmul.h"
#include "shapes.h"

namespace torch_ext {
namespace {

using at::Tensor;

// The loss options every chunk's cross-entropy call takes.
struct LossOptions {
  int64_t ignore_index;
  double label_smoothing, z_loss, softcap;
  bool ignored_row_stats;
  std::optional<at::ScalarType> loss_dtype;  // the forward's loss dtype (None: the input's)
};

// (loss, stats) of a chunk's logits.
std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& target,
                                             const std::optional<Tensor>& weight, c10::string_view reduction,
                                             const LossOptions& o) {
  auto [loss, stats, no_input_grad, no_target_grad] =
      cross_entropy_fwd_op().call(logits, target, weight, o.ignore_index, reduction, o.label_smoothing, o.z_loss,
                                  {false, false}, o.softcap, o.ignored_row_stats, o.loss_dtype);
  return {loss, stats};
}

// The logits' gradient, written over the logits.
void cross_entropy_grad_in_place(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                                 const std::optional<Tensor>& weight, const Tensor& stats, c10::string_view reduction,
                                 const LossOptions& o) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_ext::cross_entropy_bwd_inplace", "")
                             .typed<void(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                         const Tensor&, int64_t, c10::string_view, double, double, double)>();
  op.call(grad_loss, logits, target, weight, stats, o.ignore_index, reduction, o.label_smoothing, o.z_loss, o.softcap);
}

struct Shapes {
  int64_t rows, hidden, vocab;
  bool probabilities;
  std::vector<int64_t> loss_shape;  // reduction="none": input's leading dims
};

Shapes check_args(const char* op, const Tensor& input, const Tensor& linear_weight,
                  const std::optional<Tensor>& linear_bias, const Tensor& target, int64_t chunk_size) {
  TORCH_CHECK(linear_weight.dim() == 2, op, ": linear_weight must be 2-D (V, H), got shape ", linear_weight.sizes());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have shape (*, H), got a 0-D tensor");
  check_floating(op, input, "input");
  check_same_device(op, input, "input", linear_weight, "linear_weight");
  check_same_dtype(op, input, "input", linear_weight, "linear_weight");
  check_same_device(op, input, "input", target, "target");
  Shapes s;
  s.hidden = linear_weight.size(1);
  s.vocab = linear_weight.size(0);
  TORCH_CHECK(input.size(-1) == s.hidden, op, ": input.size(-1) is ", input.size(-1),
              " but linear_weight.size(1) (H) is ", s.hidden, "; they must be equal");
  if (linear_bias.has_value()) {
    TORCH_CHECK(linear_bias->dim() == 1 && linear_bias->size(0) == s.vocab, op,
                ": linear_bias must have shape (V,) = (", s.vocab, ",), got ", linear_bias->sizes());
    check_same_device(op, input, "input", *linear_bias, "linear_bias");
    check_same_dtype(op, input, "input", *linear_bias, "linear_bias");
  }
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  s.loss_shape.assign(input.sizes().begin(), input.sizes().end() - 1);
  s.rows = c10::multiply_integers(s.loss_shape);
  s.probabilities = at::isFloatingType(target.scalar_type());
  if (s.probabilities) {
    std::vector<int64_t> want = s.loss_shape;
    want.push_back(s.vocab);
    TORCH_CHECK(target.sizes() == at::IntArrayRef(want), op,
                ": a floating-point target holds class probabilities and must "
                "have shape ",
                at::IntArrayRef(want), " (input's leading dims, V), got ", target.sizes());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
                ": target must hold class indices as int64 (or uint8), or class probabilities; got ",
                target.scalar_type());
    TORCH_CHECK(target.sizes() == at::IntArrayRef(s.loss_shape), op, ": target of class indices must have shape ",
                at::IntArrayRef(s.loss_shape), " (input's leading dims), got ", target.sizes());
  }
  return s;
}

// The mean's denominator, as cross_entropy's: the summed weight of the rows not ignored (class
// indices; their count without weight), or the number of rows (probabilities). A float64 scalar
// on the input's device: reading it on the host would synchronize a GPU on every call.
Tensor mean_denominator(const Shapes& s, const Tensor& target, const std::optional<Tensor>& weight,
                        int64_t ignore_index, const at::TensorOptions& options) {
  if (s.probabilities || s.rows == 0) return at::scalar_tensor(double(s.rows), options.dtype(at::kDouble));
  const Tensor kept = target.ne(ignore_index);
  if (!weight.has_value()) return kept.sum().to(at::kDouble);
  const Tensor safe = target.to(at::kLong).masked_fill(target.eq(ignore_index), 0).clamp(0, s.vocab - 1);
  return (weight->to(at::kDouble).index_select(0, safe.reshape(-1)) * kept.reshape(-1)).sum();
}

// acc (float32) += src (bfloat16 or float16), both contiguous, in one pass of our CPU kernel
// (csrc/cpu/kernels/linear_cross_entropy.h says why not ATen's add_).
void add_widened_cpu(Tensor& acc, const Tensor& src) {
  TORCH_INTERNAL_ASSERT(acc.scalar_type() == at::kFloat && acc.is_contiguous() && src.is_contiguous() &&
                        acc.numel() == src.numel());
  const cpu::CpuKernels& k = cpu::cpu_kernels();
  if (src.scalar_type() == at::kBFloat16) {
    k.add_widened_bf16(acc.data_ptr<float>(), src.const_data_ptr<c10::BFloat16>(), acc.numel());
  } else {
    TORCH_INTERNAL_ASSERT(src.scalar_type() == at::kHalf);
    k.add_widened_f16(acc.data_ptr<float>(), src.const_data_ptr<c10::Half>(), acc.numel());
  }
}

// acc (V, H) = dlogits.T @ xc (first chunk) or += it (the others). For bfloat16/float16 acc is
// float32: on CUDA one cuBLASLt GEMM takes the 16-bit operands at tensor-core rate and adds into
// the float32 sum. On CPU the chunk's product runs as one 16-bit GEMM (ATen's, accumulating in
// float32 inside and rounding once, as eager PyTorch's whole weight-gradient GEMM does; twice the
// float32 GEMM's rate where the CPU has bfloat16 dot products) and is added into the float32 sum;
// widening the operands first cost about twice as much. Elsewhere (and on CUDA with
// TORCH_EXT_CUBLASLT=0) the operands are widened first.
// product: the CPU 16-bit path's buffer for the chunk's product, allocated by the first chunk and
// reused by the others (fresh 16-bit V x H tensors, new pages each chunk, made some steps slower).
void accumulate_weight_grad(Tensor& acc, const Tensor& dlogits, const Tensor& xc, bool first, Tensor& product) {
  const bool widen = acc.scalar_type() != dlogits.scalar_type();
#ifdef TORCH_EXT_WITH_CUDA
  if (widen && acc.is_cuda() && acc.numel() > 0 && cuda::cublaslt_enabled()) {
    cuda::LtEpilogueArgs args;
    args.accumulate = !first;
    std::string why_not;
    if (cuda::lt_gemm(dlogits.t(), xc, acc, args, &why_not)) return;
    TORCH_WARN_ONCE("torch_ext.linear_cross_entropy: cuBLASLt declined the float32-accumulated weight-gradient GEMM (",
                    why_not,
                    "); widening the chunk's operands to float32 instead (slower); a contiguous input "
                    "avoids this");
  }
#endif
  // Where ATen's 16-bit GEMM is slow, matmul_into below multiplies the 16-bit operands in float32,
  // a block at a time, into the float32 sum (csrc/matmul.h).
  if (widen && acc.is_cpu() && !cpu::aten_reduced_gemm_is_slow(dlogits.scalar_type())) {
    if (!product.defined()) product = empty_scratch(acc.sizes(), dlogits.options());
    at::mm_out(product, dlogits.t(), xc);
    if (first) {
      acc.copy_(product);
    } else {
      add_widened_cpu(acc, product);
    }
    return;
  }
  const bool widen_here = widen && !acc.is_cpu();
  const Tensor d_t = widen_here ? dlogits.t().to(acc.scalar_type()) : dlogits.t();
  const Tensor x_acc = widen_here ? xc.to(acc.scalar_type()) : xc;
  matmul_into(acc, d_t, x_acc, /*accumulate=*/!first);
}

struct Gradients {
  Tensor input, weight, bias;
};

// The chunk loop. grad_loss undefined: the forward (loss, the rows' stats, and the gradients in
// grad_mask for grad_output = 1). grad_loss defined: the backward (gradients only).
std::tuple<Tensor, Tensor, Gradients> chunk_loop(const char* op, const Tensor& input, const Tensor& linear_weight,
                                                 const std::optional<Tensor>& linear_bias, const Tensor& target,
                                                 const std::optional<Tensor>& weight, c10::string_view reduction_name,
                                                 const LossOptions& o, int64_t chunk_size,
                                                 std::array<bool, 3> grad_mask, const Tensor& grad_loss) {
  const int64_t ignore_index = o.ignore_index;
  const Shapes s = check_args(op, input, linear_weight, linear_bias, target, chunk_size);
  TORCH_CHECK_VALUE(o.softcap >= 0 && std::isfinite(o.softcap), op,
                    ": softcap must be a positive finite number (0: no softcap), got ", o.softcap);
  const Reduction reduction = parse_reduction(std::string_view(reduction_name.data(), reduction_name.size()));
  const bool forward = !grad_loss.defined();
  const at::ScalarType loss_dtype = loss_dtype_or_input(op, input, o.loss_dtype);
  const bool want_bias = grad_mask[2] && linear_bias.has_value();
  const bool any_grad = grad_mask[0] || grad_mask[1] || want_bias;
  TORCH_CHECK(!(forward && any_grad && reduction == Reduction::None), op,
              ": the forward forms gradients only for reduction 'mean' or 'sum'");
  const Tensor x = input.reshape({s.rows, s.hidden});
  const Tensor t = s.probabilities ? target.reshape({s.rows, s.vocab}) : target.reshape({s.rows});
  const Tensor w_t = linear_weight.t();
  const auto options = input.options();
  // On CPU too, every class index is checked once here, so that a bad one is reported as
  // linear_cross_entropy's (each chunk's cross_entropy_fwd checks its own again, at no sync cost).
  if (t.is_cpu() && !s.probabilities && forward) cpu::check_class_targets(op, t, s.vocab, ignore_index);
#ifdef TORCH_EXT_WITH_CUDA
  // Every class index checked once here (one synchronization, in the forward only: the backward's
  // targets are the forward's), not by each chunk's cross_entropy_fwd.
  if (t.is_cuda() && !s.probabilities && forward) cuda::check_class_targets(op, t, s.vocab, ignore_index);
  std::optional<cuda::TargetsChecked> targets_checked;
  if (t.is_cuda()) targets_checked.emplace();
#endif
  // bfloat16/float16: the weight and bias gradients accumulate across chunks in float32. With one
  // chunk there is nothing to accumulate: the chunk's 16-bit GEMM (float32 inside, one rounding)
  // is the weight gradient, as eager's, without a float32 copy and its conversion back.
  const bool reduced =
      (input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf) && s.rows > chunk_size;
  const auto acc_options = reduced ? options.dtype(at::kFloat) : options;
  // float32 class probabilities with 16-bit input (autocast: F.cross_entropy takes the 16-bit
  // logits widened to float32 and the targets as they are): each chunk's logits are widened into
  // a float32 buffer and the loss and its gradient taken there, as the reference does, not
  // against targets rounded to 16 bits (off by up to 2^-9 of each probability, which distillation
  // gradients p - t would inherit); the gradient is rounded into the chunk's 16-bit buffer for
  // the GEMMs, as autocast rounds it for F.linear's backward.
  const bool widened_loss = s.probabilities && target.scalar_type() != input.scalar_type();
  TORCH_CHECK(!widened_loss || (target.scalar_type() == at::kFloat &&
                                (input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf)),
              op, ": target (class probabilities) must have input's dtype, or float32 with bfloat16/float16 input; ",
              "got target ", target.scalar_type(), " with input ", input.scalar_type());

  // One chunk (every row at once, as in most steps of a small head): its cross-entropy takes the
  // reduction itself, so the mean's denominator, the float64 loss sum and the stats' copy, a dozen
  // small ATen ops (~4% of a 64-row step), are not needed.
  const bool one_chunk = s.rows > 0 && s.rows <= chunk_size;
  // The incoming gradient of each row's loss, as cross_entropy_bwd takes it: per row (none), or
  // one number (with several chunks each is reduced with "sum", so the mean divides by the global
  // denominator), kept on the device.
  const Tensor denominator =
      reduction == Reduction::Mean && !one_chunk ? mean_denominator(s, t, weight, ignore_index, options) : Tensor();
  Tensor grad_rows;
  Tensor grad_scalar;
  if (!forward && reduction == Reduction::None) {
    TORCH_CHECK(grad_loss.sizes() == at::IntArrayRef(s.loss_shape), op, ": grad_loss must have shape ",
                at::IntArrayRef(s.loss_shape), " for reduction='none', got ", grad_loss.sizes());
    grad_rows = grad_loss.reshape({s.rows});
  } else if (any_grad) {
    grad_scalar = forward ? at::scalar_tensor(1.0, options.dtype(at::kDouble)) : grad_loss.reshape({}).to(at::kDouble);
    if (denominator.defined()) grad_scalar = grad_scalar.div(denominator);
  }

  Gradients g;
  if (grad_mask[0]) g.input = empty_output({s.rows, s.hidden}, options);
  // The first chunk writes the weight gradient (mm_out), the others accumulate (addmm_);
  // zeros only when there is no chunk.
  if (grad_mask[1])
    g.weight =
        s.rows == 0 ? at::zeros({s.vocab, s.hidden}, acc_options) : empty_output({s.vocab, s.hidden}, acc_options);
  if (want_bias) g.bias = at::zeros({s.vocab}, acc_options);
  const bool chunked_forward = forward && !one_chunk;
  Tensor loss_rows =
      chunked_forward && reduction == Reduction::None ? at::empty({s.rows}, options.dtype(loss_dtype)) : Tensor();
  // The rows' stats as cross_entropy_fwd's (each chunk's copied in; rows x 3 numbers).
  Tensor row_stats = chunked_forward ? at::zeros({s.rows, 3}, options.dtype(accumulate_dtype(input))) : Tensor();
  // Summed in float64 where the chunks' losses are (no host synchronization per chunk on CUDA).
  Tensor loss_sum =
      chunked_forward && reduction != Reduction::None ? at::zeros({}, options.dtype(at::kDouble)) : Tensor();
  Tensor loss;

  const c10::string_view chunk_reduction = one_chunk ? reduction_name : reduction == Reduction::None ? "none" : "sum";
  const c10::string_view grad_reduction = one_chunk ? reduction_name : "sum";
  // One buffer for every chunk; on CPU in huge pages and given back to the system when the op
  // returns (not cached): this op exists to save memory, and a cached block would stay resident
  // through the rest of the training step. Page faults cost little next to the chunk's GEMMs.
  Tensor logits_buffer = empty_scratch({std::min(chunk_size, s.rows), s.vocab}, options);
  Tensor weight_product;  // (accumulate_weight_grad's)
  Tensor wide_buffer =
      widened_loss ? empty_scratch({std::min(chunk_size, s.rows), s.vocab}, options.dtype(at::kFloat)) : Tensor();
  LossOptions loss_options = o;  // the chunks' loss in loss_dtype, as the 16-bit logits' would be
  if (widened_loss) loss_options.loss_dtype = loss_dtype;
  for (int64_t r0 = 0; r0 < s.rows; r0 += chunk_size) {
    const int64_t n = std::min(chunk_size, s.rows - r0);
    const Tensor xc = x.narrow(0, r0, n);
    const Tensor tc = t.narrow(0, r0, n);
    Tensor logits = logits_buffer.narrow(0, 0, n);
    if (linear_bias.has_value()) {
      addmm_into(logits, *linear_bias, xc, w_t);
    } else {
      matmul_into(logits, xc, w_t, /*accumulate=*/false);
    }
    // The logits the loss reads (and its gradient is written over): float32 for widened_loss.
    Tensor loss_logits = logits;
    if (widened_loss) loss_logits = wide_buffer.narrow(0, 0, n).copy_(logits);
    auto [chunk_loss, stats] =
        cross_entropy_fwd(loss_logits, tc, weight, forward ? chunk_reduction : "sum", loss_options);
    if (forward && one_chunk) {
      row_stats = stats;
      loss = reduction == Reduction::None ? chunk_loss.view(s.loss_shape) : chunk_loss;
    } else if (forward) {
      row_stats.narrow(0, r0, n).copy_(stats);
      if (reduction == Reduction::None) {
        loss_rows.narrow(0, r0, n).copy_(chunk_loss);
      } else {
        loss_sum.add_(chunk_loss.to(at::kDouble));
      }
    }
    if (!any_grad) continue;
    if (grad_rows.defined()) {
      cross_entropy_grad_in_place(grad_rows.narrow(0, r0, n), loss_logits, tc, weight, stats, "none", o);
    } else {
      cross_entropy_grad_in_place(grad_scalar, loss_logits, tc, weight, stats, grad_reduction, o);
    }
    if (widened_loss) logits.copy_(loss_logits);
    const Tensor& dlogits = logits;  // now holds the logits' gradient
    if (g.input.defined()) {
      Tensor rows = g.input.narrow(0, r0, n);
      matmul_into(rows, dlogits, linear_weight, /*accumulate=*/false);
    }
    if (g.weight.defined()) accumulate_weight_grad(g.weight, dlogits, xc, /*first=*/r0 == 0, weight_product);
    if (g.bias.defined()) g.bias.add_(dlogits.sum(0, /*keepdim=*/false, g.bias.scalar_type()));
  }

  if (chunked_forward) {
    switch (reduction) {
      case Reduction::None: loss = loss_rows.view(s.loss_shape); break;
      case Reduction::Sum: loss = loss_sum.to(loss_dtype); break;
      case Reduction::Mean: loss = loss_sum.div(denominator).to(loss_dtype); break;
    }
  }
  if (g.input.defined()) g.input = g.input.view(input.sizes());
  if (reduced) {
    if (g.weight.defined()) g.weight = g.weight.to(input.scalar_type());
    if (g.bias.defined()) g.bias = g.bias.to(input.scalar_type());
  }
  return {loss, row_stats, g};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_fwd(
    const Tensor& input, const Tensor& linear_weight, const std::optional<Tensor>& linear_bias, const Tensor& target,
    const std::optional<Tensor>& weight, int64_t ignore_index, c10::string_view reduction, double label_smoothing,
    double z_loss, int64_t chunk_size, std::array<bool, 3> grad_mask, double softcap, bool ignored_row_stats,
    std::optional<at::ScalarType> loss_dtype) {
  auto [loss, stats, g] = chunk_loop(
      "torch_ext.linear_cross_entropy", input, linear_weight, linear_bias, target, weight, reduction,
      {ignore_index, label_smoothing, z_loss, softcap, ignored_row_stats, loss_dtype}, chunk_size, grad_mask, Tensor());
  return {loss, stats, g.input, g.weight, g.bias};
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_bwd(
    const Tensor& grad_loss, const Tensor& input, const Tensor& linear_weight, const std::optional<Tensor>& linear_bias,
    const Tensor& target, const std::optional<Tensor>& weight, int64_t ignore_index, c10::string_view reduction,
    double label_smoothing, double z_loss, int64_t chunk_size, std::array<bool, 3> output_mask, double softcap) {
  constexpr const char* op = "torch_ext.linear_cross_entropy_bwd";
  check_same_device(op, input, "input", grad_loss, "grad_loss");
  if (parse_reduction(std::string_view(reduction.data(), reduction.size())) != Reduction::None)
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value for reduction='", std::string(reduction),
                "', got shape ", grad_loss.sizes());
  auto [loss, stats, g] = chunk_loop(op, input, linear_weight, linear_bias, target, weight, reduction,
                                     {ignore_index, label_smoothing, z_loss, softcap, false, std::nullopt}, chunk_size,
                                     output_mask, grad_loss);
  return {g.input, g.weight, g.bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd);
}

#ifdef TORCH_EXT_WITH_CUDA
// The same chunk loop on CUDA: cuBLAS GEMMs and csrc/cuda/cross_entropy.cu through the dispatcher.
TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd);
}
#endif

}  // namespace torch_ext
