// scale_boxes: per-image rescale of xyxy boxes from the network input size to the
// original image size (torchvision's GeneralizedRCNNTransform.postprocess),
// optionally clipped to the target image.
#include "ops/scale_boxes.h"

#include <torch/library.h>

#include "ops/common/checks.h"

namespace pyodlog {

std::pair<at::Tensor, at::Tensor> check_scale_boxes_args(
    const at::Tensor& boxes,
    const at::Tensor& from_sizes,
    const at::Tensor& to_sizes,
    const std::optional<at::Tensor>& image_index) {
  checks::boxes_nx4(boxes);
  checks::sizes_bx2(from_sizes, "from_sizes");
  checks::sizes_bx2(to_sizes, "to_sizes");
  TORCH_CHECK(from_sizes.size(0) == to_sizes.size(0),
              "from_sizes and to_sizes must describe the same images, got ",
              from_sizes.size(0), " and ", to_sizes.size(0), " rows");
  checks::same_device(boxes, from_sizes, "boxes", "from_sizes");
  checks::same_device(boxes, to_sizes, "boxes", "to_sizes");
  if (image_index.has_value()) {
    checks::index_n(*image_index, boxes.size(0), "image_index");
    checks::same_device(boxes, *image_index, "boxes", "image_index");
  } else {
    TORCH_CHECK(from_sizes.size(0) == 1,
                "scale_boxes got sizes for ", from_sizes.size(0),
                " images but no image_index: pass image_index (the image of each box) "
                "or sizes for a single image");
  }
  return {from_sizes.to(at::kFloat).contiguous(), to_sizes.to(at::kFloat).contiguous()};
}

}  // namespace pyodlog

TORCH_LIBRARY_FRAGMENT(pyodlog, m) {
  m.def(
      "scale_boxes(Tensor boxes, Tensor from_sizes, Tensor to_sizes, bool clip=True, "
      "Tensor? image_index=None) -> Tensor");
}
