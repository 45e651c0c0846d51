// Activation functions shared by the CPU and CUDA kernels: the enum, its parsing, what each
// activation saves for backward, and the scalar math (host and device). The CPU vectorized
// kernels (csrc/cpu/kernels/linear_act.h) implement the same formulas on SIMD registers.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace torch_ext {

enum class Activation : int8_t {
  None = 0,
  Relu,
  LeakyRelu,
  Gelu,      // exact: x * Phi(x), as F.gelu(approximate="none")
  GeluTanh,  // F.gelu(approximate="tanh")
  Silu,
  Sigmoid,
  Tanh,
  QuickGelu,  // x * sigmoid(1.702 x), CLIP's activation (transformers' and timm's QuickGELU)
};

// What the forward pass keeps for backward besides input and weight.
enum class SavedForBackward : int8_t {
  Nothing,        // none: the derivative is 1
  PositiveMask,   // relu, leaky_relu: 1 bit per element, set where the pre-activation > 0
                  // (for relu also where it is NaN, as ATen's relu backward passes NaN)
  Output,         // sigmoid, tanh: the derivative is a function of the output
  PreActivation,  // gelu, gelu_tanh, silu, quick_gelu
};

inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "leaky_relu") return Activation::LeakyRelu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "silu") return Activation::Silu;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "tanh") return Activation::Tanh;
  if (name == "quick_gelu") return Activation::QuickGelu;
  TORCH_CHECK_VALUE(false,
                    "activation must be one of none, relu, leaky_relu, gelu, gelu_tanh, silu, "
                    "sigmoid, tanh, quick_gelu; got '",
                    std::string(name), "'");
}

C10_HOST_DEVICE inline SavedForBackward saved_for_backward(Activation act) {
  switch (act) {
    case Activation::None: return SavedForBackward::Nothing;
    case Activation::Relu:
    case Activation::LeakyRelu: return SavedForBackward::PositiveMask;
    case Activation::Sigmoid:
    case Activation::Tanh: return SavedForBackward::Output;
    default: return SavedForBackward::PreActivation;
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the A equal to `act`: the one switch
// that turns the runtime activation into the compile-time one of the kernel templates.
template <typename F>
inline void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::None: return f(std::integral_constant<Activation, Activation::None>{});
    case Activation::Relu: return f(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::LeakyRelu: return f(std::integral_constant<Activation, Activation::LeakyRelu>{});
    case Activation::Gelu: return f(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::GeluTanh: return f(std::integral_constant<Activation, Activation::GeluTanh>{});
    case Activation::Silu: return f(std::integral_constant<Activation, Activation::Silu>{});
    case Activation::Sigmoid: return f(std::integral_constant<Activation, Activation::Sigmoid>{});
    case Activation::Tanh: return f(std::integral_constant<Activation, Activation::Tanh>{});
    case Activation::QuickGelu: return f(std::integral_constant<Activation, Activation::QuickGelu>{});
  }
}

// Constants of the gelu formulas, as ATen writes them.
constexpr double kSqrt1_2 = 0.70710678118654752440;       // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1/sqrt(2*pi)
constexpr double kGeluTanhBeta = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kGeluTanhKappa = 0.044715;
// QuickGELU's sigmoid scale, as transformers and timm (and OpenAI's CLIP) write it.
constexpr double kQuickGeluScale = 1.702;

// act(x) on one element. T is the math type (float for float/half/bfloat16, double for double).
template <typename T>
C10_HOST_DEVICE inline T activation_forward(Activation act, T x, T negative_slope) {
  switch (act) {
    case Activation::None: return x;
    case Activation::Relu: return x > T(0) ? x : (x != x ? x : T(0));  // NaN propagates like F.relu
    case Activation::LeakyRelu: return x > T(0) ? x : x * negative_slope;
    case Activation::Gelu: return x * T(0.5) * (T(1) + ::erf(x * T(kSqrt1_2)));
    case Activation::GeluTanh: {
      // 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u): one exp instead of a tanh, which costs several
      // times as much.
      const T inner = T(kGeluTanhBeta) * (x + T(kGeluTanhKappa) * x * x * x);
      return x / (T(1) + ::exp(T(-2) * inner));
    }
    case Activation::Silu: return x / (T(1) + ::exp(-x));
    case Activation::Sigmoid: return T(1) / (T(1) + ::exp(-x));
    case Activation::Tanh: return ::tanh(x);
    case Activation::QuickGelu: return x / (T(1) + ::exp(T(-kQuickGeluScale) * x));
  }
  return x;
}

// d act / d pre for activations that save the pre-activation x (gelu, gelu_tanh, silu, quick_gelu).
template <typename T>
C10_HOST_DEVICE inline T activation_derivative_from_input(Activation act, T x) {
  switch (act) {
    case Activation::Gelu: {
      const T cdf = T(0.5) * (T(1) + ::erf(x * T(kSqrt1_2)));
      const T pdf = ::exp(T(-0.5) * x * x) * T(kInvSqrt2Pi);
      return cdf + x * pdf;
    }
    case Activation::GeluTanh: {
      // With s = sigmoid(2u): 0.5 * (1 + tanh(u)) = s and 1 - tanh(u)^2 = 4 s (1 - s), so
      // d/dx [x s] = s + 2 x s (1 - s) u'(x), u'(x) = beta (1 + 3 kappa x^2).
      const T x_sq = x * x;
      const T inner = T(kGeluTanhBeta) * (x + T(kGeluTanhKappa) * x_sq * x);
      const T s = T(1) / (T(1) + ::exp(T(-2) * inner));
      const T du = T(kGeluTanhBeta) * (T(1) + T(3 * kGeluTanhKappa) * x_sq);
      return s + T(2) * x * s * (T(1) - s) * du;
    }
    case Activation::Silu: {
      const T s = T(1) / (T(1) + ::exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    case Activation::QuickGelu: {  // d/dx [x s(kx)] = s + k x s (1 - s)
      const T s = T(1) / (T(1) + ::exp(T(-kQuickGeluScale) * x));
      return s * (T(1) + T(kQuickGeluScale) * x * (T(1) - s));
    }
    default: return T(1);
  }
}

// d act / d pre for activations that save the output y (sigmoid, tanh).
template <typename T>
C10_HOST_DEVICE inline T activation_derivative_from_output(Activation act, T y) {
  return act == Activation::Sigmoid ? y * (T(1) - y) : T(1) - y * y;
}

// act(x) and g * act'(x) on one element from the pre-activation x, with ATen's conventions at
// the kinks and for NaN: relu's gradient is selected (`x <= 0 ? 0 : g`, so NaN x passes g),
// leaky_relu's is `x > 0 ? g : g * slope`. (The CPU kernels do the same on SIMD registers in
// csrc/cpu/kernels/mlp_act.h.)
template <typename T>
C10_HOST_DEVICE inline void activation_value_and_grad(Activation act, T x, T g, T negative_slope, T& value, T& grad) {
  value = activation_forward(act, x, negative_slope);
  switch (act) {
    case Activation::None: grad = g; break;
    case Activation::Relu: grad = x <= T(0) ? T(0) : g; break;
    case Activation::LeakyRelu: grad = x > T(0) ? g : g * negative_slope; break;
    case Activation::Sigmoid:
    case Activation::Tanh: grad = g * activation_derivative_from_output(act, value); break;
    default: grad = g * activation_derivative_from_input(act, x);
  }
}

}  // namespace torch_ext
