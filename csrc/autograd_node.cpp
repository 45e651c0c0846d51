// See autograd_node.h.
#include "autograd_node.h"
#include "activation.h"
#include "matmul.h"
#include "op_handles.h"

#include <ATen/core/grad_mode.h>
#include <ATen/core/stack.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/ones_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <array>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

namespace torch_ext {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Autograd nodes are owned through c10::intrusive_ptr in recent PyTorch, std::shared_ptr before.
template <typename NodeT, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, NodeT>) {
    return c10::make_intrusive<NodeT>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<NodeT>(std::forward<Args>(args)...);
  }
}

// A node's owning pointer to itself (SavedVariable::unpack of a saved output needs it).
template <typename NodeT>
auto owning_ptr(NodeT* node) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, NodeT>) {
    return c10::intrusive_ptr<NodeT>::reclaim_copy(node);
  } else {
    return node->shared_from_this();
  }
}

// Calls below it skip the autograd kernels (the ops' Python register_autograd ones included).
struct BelowAutograd : c10::impl::ExcludeDispatchKeyGuard {
  BelowAutograd() : ExcludeDispatchKeyGuard(c10::autograd_dispatch_keyset_with_ADInplaceOrView) {}
};

// The keys of a tensor batched by vmap (functorch's, or the older one autograd.grad's
// is_grads_batched uses) or wrapped by a functorch transform: no value to read.
const c10::DispatchKeySet kBatchedOrWrapped({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched,
                                             c10::DispatchKey::FuncTorchGradWrapper});

// With create_graph, each gradient leaves backward through this node, which raises if it is
// differentiated. Its edges reach every input of the op's node besides the gradient's own
// history: a gradient can depend on an input the backward op never reads (fc1's bias shapes fc2's
// weight gradient through the saved pre-activation), and a second derivative through it must
// fail clearly rather than come back None.
class NoDoubleBackward final : public Node {
 public:
  NoDoubleBackward(const std::string& name, torch::autograd::edge_list&& edges) : Node(std::move(edges)), name_(name) {}
  std::string name() const override { return "NoDoubleBackward"; }
  variable_list apply(variable_list&&) override {
    TORCH_CHECK(false, name_,
                ": torch_ext does not support double backward (a gradient of its gradient, e.g. "
                "after create_graph=True); use torch.nn.functional for higher-order gradients");
  }

 private:
  std::string name_;
};

// torch_ext::linear_act_fwd, for the dense layer's and the MLP's eager paths.
const auto& linear_act_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_ext::linear_act_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const std::optional<at::Tensor>&,
                                                                       c10::string_view, double, bool)>();
  return op;
}

// Whether the activation's gradient is formed from its output (sigmoid, tanh) rather than from
// what linear_act_fwd saves (csrc/activation.h), as torch_ext/linear_act.py's autograd does.
bool grad_from_output(c10::string_view activation) {
  return saved_for_backward(parse_activation(std::string_view(activation.data(), activation.size()))) ==
         SavedForBackward::Output;
}

class OpNode final : public Node {
 public:
  explicit OpNode(NodeSpec& spec)
      : name_(spec.name),
        backward_(spec.backward),
        mask_(spec.mask),
        options_(std::move(spec.options)),
        after_mask_(std::move(spec.after_mask)),
        graph_backward_(std::move(spec.graph_backward)),
        graph_args_(std::move(spec.graph_args)) {}

  // After the output's history is set: a saved output is then known as this node's own and held
  // without its grad_fn (no reference cycle output -> node -> output).
  void save(const NodeSpec& spec) {
    for (const at::Tensor& g : spec.unit_grads) unit_grads_.emplace_back(g, /*is_output=*/false);
    for (size_t i = 0; i < spec.saved.size(); ++i)
      saved_.emplace_back(spec.saved[i], /*is_output=*/int(i) == spec.saved_output);
    for (const at::Tensor& t : spec.graph_saved) graph_saved_.emplace_back(t, /*is_output=*/false);
  }

  std::string name() const override { return name_; }

  void release_variables() override {
    for (SavedVariable& s : unit_grads_) s.reset_data();
    for (SavedVariable& s : saved_) s.reset_data();
    for (SavedVariable& s : graph_saved_) s.reset_data();
  }

  // The engine calls this before apply when the graph is not retained: call_backward then lets go
  // of each saved tensor as it hands it to the backward op, which may reuse a buffer it holds alone
  // (linear_act_bwd forms the pre-activation gradient in the saved pre-activation).
  void will_release_variables() override { hand_over_saved_ = true; }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return variable_list(num_outputs());
    if (at::GradMode::is_enabled() && graph_backward_.has_value()) {  // create_graph: differentiable again
      drop_unit_grads();  // (a later plain backward of a retained graph forms them again)
      return call_graph_backward(grad);
    }
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable once (NoDoubleBackward)
      drop_unit_grads();
      variable_list result = call_backward(grad);
      for (at::Tensor& g : result) {
        if (!g.defined()) continue;
        torch::autograd::edge_list edges = torch::autograd::collect_next_edges(g);
        const auto& inputs = next_edges();
        edges.insert(edges.end(), inputs.begin(), inputs.end());
        at::Tensor tied = g.detach().clone();
        torch::autograd::set_history(tied, make_node<NoDoubleBackward>(name_, std::move(edges)));
        g = std::move(tied);
      }
      return result;
    }
    // Moved: the backward op then holds the engine's gradient alone, unless someone else kept it (a
    // hook, the caller of backward(g)); linear_act_bwd reuses a gradient it holds alone.
    if (unit_grads_.empty()) return below_autograd_backward(std::move(grads[0]));
    variable_list unit;
    if (!handed_over_) {
      for (SavedVariable& s : unit_grads_) unit.push_back(s.unpack());
      drop_unit_grads();
    } else {  // a retained graph's later backward: the same bits as the first
      unit = below_autograd_backward(at::ones_like(grad));
    }
    // Reading the value on another device would wait for it: scaling costs less there. A gradient
    // batched by functorch (autograd.grad's is_grads_batched, jacobian's vectorize) has no value to
    // read, and scales out of place: the product is batched, the unit gradient is not.
    const bool scalar = grad.dim() == 0;
    const bool batched = grad.key_set().has_any(kBatchedOrWrapped);
    const bool unit_scale = scalar && !batched && grad.is_cpu() && grad.item<double>() == 1.0;
    const at::Tensor scale = scalar ? grad : grad.reshape({-1, 1});  // a loss per row (triplet)
    variable_list result(num_outputs());
    for (size_t i = 0; i < mask_.size(); ++i) {
      if (!mask_[i] || !should_compute_output(i) || !unit[i].defined()) continue;
      result[i] = unit_scale ? unit[i] : batched ? unit[i].mul(scale) : unit[i].mul_(scale);
    }
    return result;
  }

 private:
  void drop_unit_grads() {
    handed_over_ = true;
    for (SavedVariable& s : unit_grads_) s.reset_data();
  }

  variable_list below_autograd_backward(at::Tensor grad) { return call_backward(std::move(grad), true); }

  // backward(grad, *saved, *options, output_mask, *after_mask), one gradient per input; a pair's mask drops the
  // gradients this backward does not need (torch.autograd.grad of some inputs only). below_autograd: the op is
  // called below the autograd kernels. The saved tensors are unpacked before that, with autograd on: an unpack
  // hook may run a forward that must record its graph (non-reentrant activation checkpointing recomputes the
  // layer there).
  variable_list call_backward(at::Tensor grad, bool below_autograd = false) {
    torch::jit::Stack stack;
    stack.reserve(2 + saved_.size() + options_.size() + after_mask_.size());
    stack.emplace_back(std::move(grad));
    for (SavedVariable& s : saved_) {
      at::Tensor t = s.unpack(owning_ptr<Node>(this));
      if (hand_over_saved_) s.reset_data();
      if (t.defined())
        stack.emplace_back(std::move(t));
      else
        stack.emplace_back();
    }
    for (const c10::IValue& o : options_) stack.push_back(o);
    std::vector<bool> wanted(mask_);
    if (unit_grads_.empty())
      for (size_t i = 0; i < wanted.size(); ++i) wanted[i] = wanted[i] && should_compute_output(i);
    c10::List<bool> mask;
    for (bool m : wanted) mask.push_back(m);
    stack.emplace_back(std::move(mask));
    for (const c10::IValue& o : after_mask_) stack.push_back(o);
    {
      std::optional<BelowAutograd> below;
      if (below_autograd) below.emplace();
      backward_.callBoxed(stack);
    }
    variable_list grads(num_outputs());
    for (size_t i = 0; i < wanted.size() && i < stack.size(); ++i)
      if (wanted[i] && !stack[i].isNone()) grads[i] = stack[i].toTensor();
    return grads;
  }

  // create_graph on a node that has a graph_backward (the dense layers', cross_entropy's, the
  // regression losses'): graph_backward(grad, *args, *options, output_mask, *after_mask), with
  // autograd recording, so its gradients are differentiable again.
  variable_list call_graph_backward(const at::Tensor& grad) {
    torch::jit::Stack stack;
    stack.reserve(2 + graph_args_.size() + options_.size() + after_mask_.size());
    stack.emplace_back(grad);
    for (int i : graph_args_) {
      const bool in_saved = size_t(i) < saved_.size();
      at::Tensor t = in_saved ? saved_[i].unpack(owning_ptr<Node>(this)) : graph_saved_[i - saved_.size()].unpack();
      if (t.defined())
        stack.emplace_back(std::move(t));
      else
        stack.emplace_back();
    }
    for (const c10::IValue& o : options_) stack.push_back(o);
    c10::List<bool> mask;
    for (size_t i = 0; i < mask_.size(); ++i) mask.push_back(mask_[i] && should_compute_output(i));
    stack.emplace_back(mask);
    for (const c10::IValue& o : after_mask_) stack.push_back(o);
    graph_backward_->callBoxed(stack);
    variable_list grads(num_outputs());
    for (size_t i = 0; i < mask.size() && i < stack.size(); ++i)
      if (mask[i] && !stack[i].isNone()) grads[i] = stack[i].toTensor();
    return grads;
  }

  std::string name_;
  c10::OperatorHandle backward_;
  std::vector<bool> mask_;
  std::vector<c10::IValue> options_;
  std::vector<c10::IValue> after_mask_;
  std::vector<SavedVariable> unit_grads_;
  std::vector<SavedVariable> saved_;
  std::optional<c10::OperatorHandle> graph_backward_;
  std::vector<SavedVariable> graph_saved_;
  std::vector<int> graph_args_;
  bool handed_over_ = false;
  bool hand_over_saved_ = false;
};

// Whether an eager call takes `t`'s gradient: grad mode on and t requires grad. A loss's eager path
// with none to take runs its forward op alone: no gradients formed, no node.
bool takes_grad(const at::Tensor& t) { return at::GradMode::is_enabled() && t.defined() && t.requires_grad(); }

template <size_t K>
bool any_of(const std::array<bool, K>& mask) {
  for (bool m : mask)
    if (m) return true;
  return false;
}

// Which of the `wanted` gradients a loss's forward forms: all of them for reductions mean and sum;
// none for reduction none, whose node calls the backward op with the rows' gradients instead (a
// gradient formed for grad_loss = 1 is one for a loss of one value).
template <size_t K>
std::array<bool, K> formed_in_forward(const std::array<bool, K>& wanted, c10::string_view reduction) {
  return reduction == "none" ? std::array<bool, K>{} : wanted;
}

// The gradients a loss's forward formed, for the node: those `mask` asked for, the others None;
// none at all (a forward/backward pair node) when the mask asked for none.
template <size_t K>
std::vector<at::Tensor> masked(std::array<at::Tensor, K> grads, const std::array<bool, K>& mask) {
  if (!any_of(mask)) return {};
  std::vector<at::Tensor> result(K);
  for (size_t i = 0; i < K; ++i)
    if (mask[i]) result[i] = std::move(grads[i]);
  return result;
}

}  // namespace

void set_node_history(const at::Tensor& output, NodeSpec spec) {
  auto node = make_node<OpNode>(spec);
  node->set_next_edges(torch::autograd::collect_next_edges(spec.inputs));
  torch::autograd::set_history(output, node);
  node->save(spec);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_eager(const at::Tensor& input, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                       c10::string_view reduction, double label_smoothing,
                                                       double z_loss, double softcap, bool ignored_row_stats,
                                                       std::optional<at::ScalarType> loss_dtype) {
  const auto& forward = cross_entropy_fwd_op();
  static const auto backward = c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::cross_entropy_bwd", "");
  static const auto graph_backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::cross_entropy_bwd_composite", "");
  // The input's gradient only: the Python layer takes another path when a target requires grad.
  const std::array<bool, 2> wanted = {takes_grad(input), false};
  const std::array<bool, 2> mask = formed_in_forward(wanted, reduction);
  at::Tensor loss, stats, grad_input, grad_target;
  {
    BelowAutograd below_autograd;
    std::tie(loss, stats, grad_input, grad_target) =
        forward.call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, mask, softcap,
                     ignored_row_stats, loss_dtype);
  }
  if (!any_of(wanted)) return {loss, stats};
  set_node_history(loss, {"CrossEntropyBackward",
                          backward,
                          {input, target},
                          {wanted[0], wanted[1]},
                          masked<2>({grad_input, grad_target}, mask),
                          {input, target, weight.value_or(at::Tensor()), stats},
                          -1,
                          {c10::IValue(ignore_index), c10::IValue(std::string(reduction)), c10::IValue(label_smoothing),
                           c10::IValue(z_loss)},
                          {c10::IValue(softcap), c10::IValue()},
                          graph_backward,
                          {},
                          {0, 1, 2}});  // input, target, weight
  return {loss, stats};
}

at::Tensor regression_loss_eager(const at::Tensor& input, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, c10::string_view loss, double param,
                                 c10::string_view reduction, std::optional<at::ScalarType> loss_dtype) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::regression_loss_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, double,
              c10::string_view, std::array<bool, 2>, std::optional<at::ScalarType>)>();
  static const auto backward = c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::regression_loss_bwd", "");
  static const auto graph_backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::regression_loss_bwd_composite", "");
  const std::array<bool, 2> wanted = {takes_grad(input), takes_grad(target)};
  const std::array<bool, 2> mask = formed_in_forward(wanted, reduction);
  at::Tensor value, grad_input, grad_target;
  {
    BelowAutograd below_autograd;
    std::tie(value, grad_input, grad_target) =
        forward.call(input, target, weight, loss, param, reduction, mask, loss_dtype);
  }
  if (!any_of(wanted)) return value;
  set_node_history(value, {"RegressionLossBackward",
                           backward,
                           {input, target},
                           {wanted[0], wanted[1]},
                           masked<2>({grad_input, grad_target}, mask),
                           {input, target, weight.value_or(at::Tensor())},
                           -1,
                           {c10::IValue(std::string(loss)), c10::IValue(param), c10::IValue(std::string(reduction))},
                           {},
                           graph_backward,
                           {},
                           {0, 1, 2}});  // input, target, weight
  return value;
}

at::Tensor triplet_margin_loss_eager(const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
                                     double margin, double p, double eps, bool swap, c10::string_view reduction,
                                     std::optional<at::ScalarType> loss_dtype) {
  using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::triplet_margin_loss_fwd", "")
          .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double, bool,
                         c10::string_view, std::array<bool, 3>, std::optional<at::ScalarType>)>();
  static const auto backward = c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::triplet_margin_loss_bwd", "");
  const std::array<bool, 3> mask = {takes_grad(anchor), takes_grad(positive), takes_grad(negative)};
  at::Tensor loss, dist, grad_anchor, grad_positive, grad_negative;
  {
    BelowAutograd below_autograd;
    std::tie(loss, dist, grad_anchor, grad_positive, grad_negative) =
        forward.call(anchor, positive, negative, margin, p, eps, swap, reduction, mask, loss_dtype);
  }
  if (!any_of(mask)) return loss;
  set_node_history(loss, {"TripletMarginLossBackward",
                          backward,
                          {anchor, positive, negative},
                          {mask[0], mask[1], mask[2]},
                          masked<3>({grad_anchor, grad_positive, grad_negative}, mask),
                          {anchor, positive, negative, dist},
                          -1,
                          {c10::IValue(margin), c10::IValue(p), c10::IValue(eps), c10::IValue(swap),
                           c10::IValue(std::string(reduction))}});
  return loss;
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_eager(
    const at::Tensor& input, const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index, c10::string_view reduction,
    double label_smoothing, double z_loss, int64_t chunk_size, double softcap, bool ignored_row_stats,
    std::optional<at::ScalarType> loss_dtype) {
  using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::linear_cross_entropy_fwd", "")
          .typed<Outputs(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                         const std::optional<at::Tensor>&, int64_t, c10::string_view, double, double, int64_t,
                         std::array<bool, 3>, double, bool, std::optional<at::ScalarType>)>();
  static const auto backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::linear_cross_entropy_bwd", "");
  const at::Tensor bias = linear_bias.value_or(at::Tensor());
  const std::array<bool, 3> wanted = {takes_grad(input), takes_grad(linear_weight), takes_grad(bias)};
  const std::array<bool, 3> mask = formed_in_forward(wanted, reduction);
  at::Tensor loss, grad_input, grad_weight, grad_bias, stats;
  {
    BelowAutograd below_autograd;
    std::tie(loss, stats, grad_input, grad_weight, grad_bias) =
        forward.call(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
                     z_loss, chunk_size, mask, softcap, ignored_row_stats, loss_dtype);
  }
  if (!any_of(wanted)) return {loss, stats};
  set_node_history(loss, {"LinearCrossEntropyBackward",
                          backward,
                          {input, linear_weight, bias},
                          {wanted[0], wanted[1], wanted[2]},
                          masked<3>({grad_input, grad_weight, grad_bias}, mask),
                          {input, linear_weight, bias, target, weight.value_or(at::Tensor())},
                          -1,
                          {c10::IValue(ignore_index), c10::IValue(std::string(reduction)), c10::IValue(label_smoothing),
                           c10::IValue(z_loss), c10::IValue(chunk_size)},
                          {c10::IValue(softcap)}});
  return {loss, stats};
}

at::Tensor linear_act_eager(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view activation, double negative_slope) {
  static const auto backward = c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::linear_act_bwd", "");
  static const auto graph_backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::linear_act_bwd_composite", "");
  const at::Tensor b = bias.value_or(at::Tensor());
  const bool autograd = takes_grad(input) || takes_grad(weight) || takes_grad(b);
  at::Tensor out, saved;
  {
    BelowAutograd below_autograd;
    std::tie(out, saved) = linear_act_fwd_op().call(input, weight, bias, activation, negative_slope, autograd);
  }
  if (!autograd) return out;  // no node, and nothing was saved for one
  const bool from_output = grad_from_output(activation);
  set_node_history(out, {"FusedLinearBackward",
                         backward,
                         {input, weight, b},
                         {input.requires_grad(), weight.requires_grad(), b.defined() && b.requires_grad()},
                         {},
                         {input, weight, from_output ? out : saved},
                         from_output ? 2 : -1,
                         {c10::IValue(std::string(activation)), c10::IValue(negative_slope)},
                         {},
                         graph_backward,
                         {b},
                         {0, 1, 3}});  // input, weight, bias
  return out;
}

at::Tensor mlp_eager(const at::Tensor& input, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                     const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                     c10::string_view activation, double negative_slope, bool gated, bool recompute) {
  const auto& linear_fwd = linear_act_fwd_op();
  static const auto act_fwd = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("torch_ext::mlp_act_fwd", "")
                                  .typed<at::Tensor(const at::Tensor&, c10::string_view, double, bool)>();
  static const auto backward = c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::mlp_bwd", "");
  static const auto graph_backward = c10::Dispatcher::singleton().findSchemaOrThrow("torch_ext::mlp_bwd_composite", "");
  const at::Tensor b1 = fc1_bias.value_or(at::Tensor()), b2 = fc2_bias.value_or(at::Tensor());
  const bool autograd =
      takes_grad(input) || takes_grad(fc1_weight) || takes_grad(b1) || takes_grad(fc2_weight) || takes_grad(b2);
  at::Tensor out, hidden, saved;
  {
    BelowAutograd below_autograd;
    if (gated) {  // fc1 with its bias, then one pass for act(u) * v
      saved = std::get<0>(linear_fwd.call(input, fc1_weight, fc1_bias, "none", 0.0, false));
      hidden = act_fwd.call(saved, activation, negative_slope, true);
    } else {
      std::tie(hidden, saved) = linear_fwd.call(input, fc1_weight, fc1_bias, activation, negative_slope, autograd);
    }
    out = dense_linear(hidden, fc2_weight, fc2_bias);
  }
  if (!autograd) return out;  // no node, and nothing was saved for one
  if (!gated && grad_from_output(activation)) saved = hidden;
  set_node_history(out, {"FusedMLPBackward",
                         backward,
                         {input, fc1_weight, b1, fc2_weight, b2},
                         {input.requires_grad(), fc1_weight.requires_grad(), b1.defined() && b1.requires_grad(),
                          fc2_weight.requires_grad(), b2.defined() && b2.requires_grad()},
                         {},
                         {input, fc1_weight, fc2_weight, saved, recompute ? at::Tensor() : hidden},
                         -1,
                         {c10::IValue(std::string(activation)), c10::IValue(negative_slope), c10::IValue(gated)},
                         {},
                         graph_backward,
                         {b1},
                         {0, 1, 5, 2}});  // input, fc1_weight, fc1_bias, fc2_weight
  return out;
}

}  // namespace torch_ext
