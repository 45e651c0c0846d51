// Fused triplet margin loss on CUDA; the same ops and formulas as csrc/cpu/triplet_margin_loss.cpp
// (see csrc/cpu/kernels/triplet_margin_loss.h for the formulas).
//   forward : one block per row: the three p-norm sums reduced over the block in a fixed order,
//             the row's loss and distances; with grad_mask it then writes the
//             gradients for grad_output = 1 in the same kernel, while the row is in L1/L2.
//   backward: one block per row, one read of the inputs and one write of each gradient.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>
#include <vector>

#include "checks.h"
#include "cuda/reduce.cuh"
#include "loss.h"
#include "loss_checks.h"

namespace torch_ext {
namespace {

using at::Tensor;

template <typename S>
struct TripletArgs {
  using A = at::acc_type<S, true>;
  int64_t rows, dim;
  const S* anchor;
  const S* positive;
  const S* negative;
  A margin, p, eps;
  bool swap;
  A* dist;             // (rows, 3): d(a, p), d(a, n), d(p, n) (0 without swap)
  A* row_loss;         // forward
  const A* row_scale;  // per row (reduction none), or
  const A* scale;      // a device scalar for every row; null in the forward: `unit_scale`
  A unit_scale;        // the forward's gradients: 1, or 1 / rows for mean
  S* grad_anchor;      // each may be nullptr
  S* grad_positive;
  S* grad_negative;
};

template <typename A>
__device__ __forceinline__ A norm_term(A v, A p) {
  const A z = v < A(0) ? -v : v;
  return p == A(1) ? z : p == A(2) ? v * v : ::pow(z, p);
}

template <typename A>
__device__ __forceinline__ A finish_norm(A sum, A p) {
  return p == A(1) ? sum : p == A(2) ? ::sqrt(sum) : ::pow(sum, A(1) / p);
}

// u(v) = coef * sign(v) |v|^(p-1) (coef = 1 / d^(p-1), 0 when d == 0); sign(0) = 0, NaN stays NaN.
template <typename A>
__device__ __forceinline__ A norm_grad(A v, A coef, A p) {
  const A sign = v > A(0) ? A(1) : (v < A(0) ? A(-1) : v * A(0));
  if (p == A(1)) return coef * sign;
  if (p == A(2)) return coef * v;
  return v == A(0) ? A(0) : coef * sign * ::pow(v < A(0) ? -v : v, p - A(1));
}

template <typename A>
struct Sums3 {
  A ap, an, pn;
};

// The row's gradient coefficients from its distances and incoming gradient g (see the CPU kernel).
template <typename A>
struct RowCoefficients {
  A ap, an, pn;  // times norm_grad of (a - p), (a - n), (p - n); all 0 for an inactive triplet
};

template <typename A>
__device__ RowCoefficients<A> row_coefficients(A d_ap, A d_an, A d_pn, A g, A margin, A p, bool swap) {
  const auto coef_of = [p](A d) -> A {
    if (d == A(0)) return A(0);
    return p == A(1) ? A(1) : p == A(2) ? A(1) / d : A(1) / ::pow(d, p - A(1));
  };
  A w_an = 1, w_pn = 0;  // how d_neg depends on d(a, n) and d(p, n); a tie splits the gradient
  if (swap) {
    if (d_pn < d_an) {
      w_an = 0;
      w_pn = 1;
    } else if (d_pn == d_an) {
      w_an = w_pn = A(0.5);
    }
  }
  const A d_neg = w_an * d_an + w_pn * d_pn;
  if (!(margin + d_ap - d_neg >= A(0))) g = 0;  // clamp_min passes the gradient where x >= 0
  return {g * coef_of(d_ap), g * w_an * coef_of(d_an), g * w_pn * coef_of(d_pn)};
}

template <typename S>
__device__ void write_row_gradients(const TripletArgs<S>& a, int64_t r,
                                    const RowCoefficients<at::acc_type<S, true>>& k) {
  using A = at::acc_type<S, true>;
  const int64_t D = a.dim;
  const S* x = a.anchor + r * D;
  const S* y = a.positive + r * D;
  const S* z = a.negative + r * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const A xv = A(x[i]), yv = A(y[i]), zv = A(z[i]);
    const A u_ap = k.ap != A(0) ? norm_grad(xv - yv + a.eps, k.ap, a.p) : A(0);
    const A u_an = k.an != A(0) ? norm_grad(xv - zv + a.eps, k.an, a.p) : A(0);
    const A u_pn = k.pn != A(0) ? norm_grad(yv - zv + a.eps, k.pn, a.p) : A(0);
    if (a.grad_anchor) a.grad_anchor[r * D + i] = S(u_ap - u_an);
    if (a.grad_positive) a.grad_positive[r * D + i] = S(-u_ap - u_pn);
    if (a.grad_negative) a.grad_negative[r * D + i] = S(u_an + u_pn);
  }
}

template <typename S>
__global__ void forward_kernel(TripletArgs<S> a) {
  using A = at::acc_type<S, true>;
  __shared__ A partials[3][32];
  __shared__ RowCoefficients<A> coefficients;
  const int64_t D = a.dim;
  const bool with_grads = a.grad_anchor || a.grad_positive || a.grad_negative;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const S* x = a.anchor + r * D;
    const S* y = a.positive + r * D;
    const S* z = a.negative + r * D;
    A s_ap = 0, s_an = 0, s_pn = 0;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const A xv = A(x[i]), yv = A(y[i]), zv = A(z[i]);
      s_ap += norm_term(xv - yv + a.eps, a.p);
      s_an += norm_term(xv - zv + a.eps, a.p);
      if (a.swap) s_pn += norm_term(yv - zv + a.eps, a.p);
    }
    s_ap = block_sum(s_ap, partials[0]);
    s_an = block_sum(s_an, partials[1]);
    s_pn = block_sum(s_pn, partials[2]);
    if (threadIdx.x == 0) {
      const A d_ap = finish_norm(s_ap, a.p), d_an = finish_norm(s_an, a.p);
      const A d_pn = a.swap ? finish_norm(s_pn, a.p) : A(0);
      // torch.minimum, NaN-propagating
      const A d_neg = !a.swap ? d_an : (d_an != d_an || d_pn != d_pn) ? d_an + d_pn : (d_pn < d_an ? d_pn : d_an);
      const A v = a.margin + d_ap - d_neg;
      a.row_loss[r] = v != v ? v : (v > A(0) ? v : A(0));
      a.dist[3 * r] = d_ap;
      a.dist[3 * r + 1] = d_an;
      a.dist[3 * r + 2] = d_pn;
      if (with_grads) coefficients = row_coefficients(d_ap, d_an, d_pn, a.unit_scale, a.margin, a.p, a.swap);
    }
    __syncthreads();
    if (with_grads) write_row_gradients(a, r, coefficients);
    __syncthreads();  // partials and coefficients are reused by the next row
  }
}

template <typename S>
__global__ void backward_kernel(TripletArgs<S> a) {
  using A = at::acc_type<S, true>;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const A g = a.row_scale ? a.row_scale[r] : *a.scale;
    const RowCoefficients<A> k =
        row_coefficients(a.dist[3 * r], a.dist[3 * r + 1], a.dist[3 * r + 2], g, a.margin, a.p, a.swap);
    write_row_gradients(a, r, k);
  }
}

// ---- host side -------------------------------------------------------------------------------

std::vector<int64_t> loss_shape(const Tensor& anchor) {
  return anchor.dim() == 2 ? std::vector<int64_t>{anchor.size(0)} : std::vector<int64_t>{};
}

template <typename S>
TripletArgs<S> kernel_args(const Tensor& a, const Tensor& p, const Tensor& n, double margin, double norm_p, double eps,
                           bool swap, const Tensor& dist, Tensor (&grads)[3]) {
  using A = at::acc_type<S, true>;
  TripletArgs<S> args{};
  args.rows = a.dim() == 2 ? a.size(0) : 1;
  args.dim = a.size(-1);
  args.anchor = a.const_data_ptr<S>();
  args.positive = p.const_data_ptr<S>();
  args.negative = n.const_data_ptr<S>();
  args.margin = A(margin);
  args.p = A(norm_p);
  args.eps = A(eps);
  args.swap = swap;
  args.dist = const_cast<A*>(dist.const_data_ptr<A>());
  args.grad_anchor = grads[0].defined() ? grads[0].data_ptr<S>() : nullptr;
  args.grad_positive = grads[1].defined() ? grads[1].data_ptr<S>() : nullptr;
  args.grad_negative = grads[2].defined() ? grads[2].data_ptr<S>() : nullptr;
  return args;
}

int threads_for(int64_t dim) {
  int threads = 32;
  while (threads < 256 && threads < dim) threads *= 2;
  return threads;
}

int64_t grid_for(int64_t rows) { return std::min<int64_t>(std::max<int64_t>(rows, 1), int64_t(1) << 30); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_impl(const char* op, const Tensor& anchor,
                                                                const Tensor& positive, const Tensor& negative,
                                                                double margin, double p, double eps, bool swap,
                                                                c10::string_view reduction,
                                                                std::array<bool, 3> grad_mask,
                                                                std::optional<at::ScalarType> loss_dtype) {
  const c10::cuda::CUDAGuard guard(anchor.device());
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  check_triplet_args(op, anchor, positive, negative, p);
  const at::ScalarType dtype = loss_dtype_or_input(op, anchor, loss_dtype);
  const Tensor a = anchor.contiguous(), pos = positive.contiguous(), neg = negative.contiguous();
  const int64_t rows = a.dim() == 2 ? a.size(0) : 1;
  const auto acc_options = anchor.options().dtype(accumulate_dtype(anchor));
  Tensor dist = at::empty({rows, 3}, acc_options);
  Tensor row_loss = at::empty({rows}, acc_options);
  Tensor grads[3];
  for (int i = 0; i < 3; ++i)
    if (grad_mask[i]) grads[i] = at::empty(anchor.sizes(), anchor.options());
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, anchor.scalar_type(), "triplet_margin_loss_fwd_cuda", [&] {
          using A = at::acc_type<scalar_t, true>;
          auto args = kernel_args<scalar_t>(a, pos, neg, margin, p, eps, swap, dist, grads);
          args.row_loss = row_loss.data_ptr<A>();
          args.unit_scale = red == Reduction::Mean ? A(1.0 / double(rows)) : A(1);
          forward_kernel<scalar_t>
              <<<grid_for(rows), threads_for(args.dim), 0, c10::cuda::getCurrentCUDAStream()>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  Tensor loss;
  switch (red) {
    case Reduction::None: loss = row_loss.to(dtype).view(loss_shape(anchor)); break;
    case Reduction::Sum: loss = row_loss.sum().to(dtype); break;
    case Reduction::Mean: loss = row_loss.sum().div(double(rows)).to(dtype); break;
  }
  return {loss, dist, grads[0], grads[1], grads[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> triplet_margin_loss_fwd_cuda(
    const Tensor& anchor, const Tensor& positive, const Tensor& negative, double margin, double p, double eps,
    bool swap, c10::string_view reduction, std::array<bool, 3> grad_mask, std::optional<at::ScalarType> loss_dtype) {
  return forward_impl("torch_ext.triplet_margin_loss", anchor, positive, negative, margin, p, eps, swap, reduction,
                      grad_mask, loss_dtype);
}

std::tuple<Tensor, Tensor, Tensor> triplet_margin_loss_bwd_cuda(const Tensor& grad_loss, const Tensor& anchor,
                                                                const Tensor& positive, const Tensor& negative,
                                                                const Tensor& dist, double margin, double p, double eps,
                                                                bool swap, c10::string_view reduction,
                                                                std::array<bool, 3> output_mask) {
  constexpr const char* op = "torch_ext.triplet_margin_loss_bwd";
  const c10::cuda::CUDAGuard guard(anchor.device());
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  check_triplet_args(op, anchor, positive, negative, p);
  const int64_t rows = anchor.dim() == 2 ? anchor.size(0) : 1;
  const auto acc = accumulate_dtype(anchor);
  check_row_stats(op, anchor, "anchor", dist, "dist", rows, acc, "triplet_margin_loss_fwd");
  check_same_device(op, anchor, "anchor", grad_loss, "grad_loss");
  Tensor row_scale, scale;
  check_grad_loss(op, grad_loss, red, reduction, at::IntArrayRef(loss_shape(anchor)));
  if (red == Reduction::None) {
    row_scale = grad_loss.to(acc).contiguous();
  } else {
    scale = grad_loss.reshape({}).to(acc);
    if (red == Reduction::Mean) scale = scale.div(double(rows));
  }
  const Tensor a = anchor.contiguous(), pos = positive.contiguous(), neg = negative.contiguous();
  const Tensor dist_c = dist.contiguous();
  Tensor grads[3];
  for (int i = 0; i < 3; ++i)
    if (output_mask[i]) grads[i] = at::empty(anchor.sizes(), anchor.options());
  if (rows > 0 && (output_mask[0] || output_mask[1] || output_mask[2])) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, anchor.scalar_type(), "triplet_margin_loss_bwd_cuda", [&] {
          using A = at::acc_type<scalar_t, true>;
          auto args = kernel_args<scalar_t>(a, pos, neg, margin, p, eps, swap, dist_c, grads);
          args.row_scale = row_scale.defined() ? row_scale.const_data_ptr<A>() : nullptr;
          args.scale = scale.defined() ? scale.const_data_ptr<A>() : nullptr;
          backward_kernel<scalar_t>
              <<<grid_for(rows), threads_for(args.dim), 0, c10::cuda::getCurrentCUDAStream()>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("triplet_margin_loss_fwd", &triplet_margin_loss_fwd_cuda);
  m.impl("triplet_margin_loss_bwd", &triplet_margin_loss_bwd_cuda);
}

}  // namespace torch_ext
