/* PIL's bilinear resize (Image.resize(size, BILINEAR, box)) of uint8 images, to the bit.
 *
 * The release resizes every crop with Pillow, whose resampler is scalar C: 0.73 ms per
 * 224 px view of a 500x375 photo on one core, half the host's time per image. This one
 * does Pillow's integer arithmetic (coefficients computed in double as Pillow computes
 * them and rounded to 22 fractional bits, two passes each rounded to uint8, in Pillow
 * 13's order), so its output equals Pillow's byte for byte (tests/test_resample.py), in
 * 0.116 ms: on x86-64 CPUs with AVX2 both passes are vectorised (the vertical one 32
 * bytes of a row at a time, the horizontal one two RGB pixels per register); elsewhere
 * (or per call with portable=True, which the tests use to check it) plain C runs
 * (0.52 ms). It reads numpy arrays in place (any row stride: a crop of a decoded
 * image is a view) and releases the GIL: the input pipeline runs it on a thread pool.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_DISPATCH 1
#include <immintrin.h>
#endif

#define FRACTION_BITS 22 /* Pillow's precision for 8-bit images: 32 - 8 - 2 */
#define HALF (1 << (FRACTION_BITS - 1))

/* One axis: output i reads inputs first[i] .. first[i] + taps[i] - 1 with weights
 * weight[i * stride ..]. */
typedef struct {
  int *first, *taps;
  int32_t *weight;
  int stride;
} Axis;

static void free_axis(Axis *axis) {
  free(axis->first);
  free(axis->taps);
  free(axis->weight);
}

/* The triangle filter of half-width max(1, shrink), centred on each output pixel's centre
 * mapped into [start, stop) of the input, cut to the input and normalised: Pillow's
 * bilinear coefficients, with its rounding of the window's ends and of the weights. */
static int make_axis(int in_size, float start, float stop, int out_size, Axis *axis) {
  double scale = (double)(stop - start) / out_size;
  double filter_scale = scale < 1.0 ? 1.0 : scale;
  double support = filter_scale; /* bilinear: support 1 input pixel, widened by the shrink */
  int stride = (int)ceil(support) * 2 + 1;
  double *w = malloc(sizeof(double) * stride);
  axis->first = malloc(sizeof(int) * out_size);
  axis->taps = malloc(sizeof(int) * out_size);
  axis->weight = calloc((size_t)out_size * stride, sizeof(int32_t));
  axis->stride = stride;
  if (!w || !axis->first || !axis->taps || !axis->weight) {
    free(w);
    free_axis(axis);
    return -1;
  }
  for (int i = 0; i < out_size; i++) {
    double centre = start + (i + 0.5) * scale;
    int lo = (int)(centre - support + 0.5);
    int hi = (int)(centre + support + 0.5);
    if (lo < 0) lo = 0;
    if (hi > in_size) hi = in_size;
    int n = hi - lo;
    double total = 0.0;
    for (int t = 0; t < n; t++) {
      double d = fabs((t + lo - centre + 0.5) * (1.0 / filter_scale));
      w[t] = d < 1.0 ? 1.0 - d : 0.0;
      total += w[t];
    }
    int32_t *out = axis->weight + (size_t)i * stride;
    for (int t = 0; t < n; t++) {
      double v = total != 0.0 ? w[t] / total : w[t];
      out[t] = (int32_t)(v < 0 ? -0.5 + v * (1 << FRACTION_BITS)
                               : 0.5 + v * (1 << FRACTION_BITS));
    }
    axis->first[i] = lo;
    axis->taps[i] = n;
  }
  free(w);
  return 0;
}

static inline uint8_t to_uint8(int32_t sum) {
  int32_t v = sum >> FRACTION_BITS;
  return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* Output row i = weighted sum of input rows first[i].. (each `width` bytes), a chunk of
 * the row at a time: plain loops the compiler vectorises (SSE2, NEON). */
#define CHUNK 256
static void vertical_generic(const uint8_t *src, ptrdiff_t src_stride, uint8_t *dst,
                             ptrdiff_t dst_stride, int width, int rows, const Axis *axis) {
  int32_t acc[CHUNK];
  for (int i = 0; i < rows; i++) {
    const int32_t *k = axis->weight + (size_t)i * axis->stride;
    const uint8_t *top = src + (ptrdiff_t)axis->first[i] * src_stride;
    uint8_t *out = dst + (ptrdiff_t)i * dst_stride;
    for (int x0 = 0; x0 < width; x0 += CHUNK) {
      int m = width - x0 < CHUNK ? width - x0 : CHUNK;
      for (int x = 0; x < m; x++) acc[x] = HALF;
      for (int t = 0; t < axis->taps[i]; t++) {
        const uint8_t *row = top + (ptrdiff_t)t * src_stride + x0;
        int32_t c = k[t];
        for (int x = 0; x < m; x++) acc[x] += (int32_t)row[x] * c;
      }
      for (int x = 0; x < m; x++) out[x0 + x] = to_uint8(acc[x]);
    }
  }
}

typedef void (*VerticalFn)(const uint8_t *, ptrdiff_t, uint8_t *, ptrdiff_t, int, int,
                           const Axis *);

/* Output pixel j of each row = weighted sum of input pixels first[j].. of that row. */
static void horizontal_generic(const uint8_t *src, ptrdiff_t src_stride, int rows,
                               int channels, uint8_t *dst, ptrdiff_t dst_stride,
                               int out_width, const Axis *axis) {
  for (int y = 0; y < rows; y++) {
    const uint8_t *row = src + (ptrdiff_t)y * src_stride;
    uint8_t *out = dst + (ptrdiff_t)y * dst_stride;
    for (int j = 0; j < out_width; j++) {
      const int32_t *k = axis->weight + (size_t)j * axis->stride;
      const uint8_t *p = row + (ptrdiff_t)axis->first[j] * channels;
      if (channels == 3) {
        int32_t r = HALF, g = HALF, b = HALF;
        for (int t = 0; t < axis->taps[j]; t++, p += 3) {
          r += (int32_t)p[0] * k[t];
          g += (int32_t)p[1] * k[t];
          b += (int32_t)p[2] * k[t];
        }
        out[3 * j] = to_uint8(r);
        out[3 * j + 1] = to_uint8(g);
        out[3 * j + 2] = to_uint8(b);
      } else {
        int32_t sum = HALF;
        for (int t = 0; t < axis->taps[j]; t++) sum += (int32_t)p[t] * k[t];
        out[j] = to_uint8(sum);
      }
    }
  }
}

typedef void (*HorizontalFn)(const uint8_t *, ptrdiff_t, int, int, uint8_t *, ptrdiff_t, int,
                             const Axis *);

#ifdef HAVE_X86_DISPATCH
#define AVX2 __attribute__((target("avx2")))

/* 32 bytes of a row at a time, their sums in four registers across the taps. */
static AVX2 void vertical_avx2(const uint8_t *src, ptrdiff_t src_stride, uint8_t *dst,
                               ptrdiff_t dst_stride, int width, int rows, const Axis *axis) {
  const __m256i half = _mm256_set1_epi32(HALF);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the packs' */
  for (int i = 0; i < rows; i++) {
    const int32_t *k = axis->weight + (size_t)i * axis->stride;
    const uint8_t *top = src + (ptrdiff_t)axis->first[i] * src_stride;
    int n = axis->taps[i];
    uint8_t *out = dst + (ptrdiff_t)i * dst_stride;
    int x = 0;
    for (; x + 32 <= width; x += 32) {
      __m256i a0 = half, a1 = half, a2 = half, a3 = half;
      for (int t = 0; t < n; t++) {
        const uint8_t *r = top + (ptrdiff_t)t * src_stride + x;
        __m256i c = _mm256_set1_epi32(k[t]);
        __m128i lo = _mm_loadu_si128((const __m128i *)r);
        __m128i hi = _mm_loadu_si128((const __m128i *)(r + 16));
        a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(lo), c));
        a1 = _mm256_add_epi32(
            a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), c));
        a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(hi), c));
        a3 = _mm256_add_epi32(
            a3, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), c));
      }
      __m256i w01 = _mm256_packs_epi32(_mm256_srai_epi32(a0, FRACTION_BITS),
                                       _mm256_srai_epi32(a1, FRACTION_BITS));
      __m256i w23 = _mm256_packs_epi32(_mm256_srai_epi32(a2, FRACTION_BITS),
                                       _mm256_srai_epi32(a3, FRACTION_BITS));
      __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w01, w23), order);
      _mm256_storeu_si256((__m256i *)(out + x), bytes);
    }
    for (; x < width; x++) {
      int32_t sum = HALF;
      for (int t = 0; t < n; t++) sum += (int32_t)top[(ptrdiff_t)t * src_stride + x] * k[t];
      out[x] = to_uint8(sum);
    }
  }
}

/* Output pixels 2p and 2p + 1 of one row, for each of `pairs` pairs. */
static inline __attribute__((always_inline)) AVX2 void rgb_pairs_avx2(
    const uint8_t *row, uint8_t *out, int pairs, const int *first, const int32_t *weights,
    int taps) {
  const __m256i half = _mm256_set1_epi32(HALF);
  for (int p = 0; p < pairs; p++) {
    const uint8_t *left = row + (ptrdiff_t)first[2 * p] * 3;
    const uint8_t *right = row + (ptrdiff_t)first[2 * p + 1] * 3;
    const int32_t *w = weights + (size_t)p * taps * 8;
    __m256i sum = half;
    for (int t = 0; t < taps; t++) {
      int32_t a, b;
      memcpy(&a, left + 3 * t, 4);
      memcpy(&b, right + 3 * t, 4);
      __m256i pixels = _mm256_cvtepu8_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(a), b, 1));
      __m256i c = _mm256_loadu_si256((const __m256i *)(w + 8 * t));
      sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(pixels, c));
    }
    sum = _mm256_srai_epi32(sum, FRACTION_BITS);
    __m256i packed = _mm256_packus_epi16(_mm256_packs_epi32(sum, sum), sum);
    int32_t a = _mm_cvtsi128_si32(_mm256_castsi256_si128(packed));
    int32_t b = _mm_cvtsi128_si32(_mm256_extracti128_si256(packed, 1));
    memcpy(out + 6 * p, &a, 4);
    memcpy(out + 6 * p + 3, &b, 4);
  }
}

/* RGB, two output pixels per register (one per 128-bit half, channels in its lanes), one
 * multiply-add per tap. A pixel is loaded as 4 bytes (its 3 and the next pixel's first,
 * multiplied but never stored) and stored as 4 (the 4th overwritten by the next pixel),
 * so output pixels whose reads or store could pass the end of a row go through
 * horizontal_generic. */
static AVX2 void horizontal_rgb_avx2(const uint8_t *src, ptrdiff_t src_stride, int rows,
                                     int channels, uint8_t *dst, ptrdiff_t dst_stride,
                                     int out_width, const Axis *axis) {
  (void)channels;
  /* Every pair runs the same number of taps (zero weights past a pixel's own): a loop
   * count that changes from pair to pair costs a branch misprediction each time. The
   * inputs the last output pixel reads reach furthest: no pixel at or past in_width - 1
   * may be read as 4 bytes. */
  int in_width = axis->first[out_width - 1] + axis->taps[out_width - 1];
  int taps = 1;
  for (int j = 0; j < out_width; j++)
    if (axis->taps[j] > taps) taps = axis->taps[j];
  int pairs = 0; /* the last output pixel never goes in a pair */
  while (2 * pairs + 2 < out_width && axis->first[2 * pairs + 1] + taps < in_width) pairs++;
  int32_t *weights = calloc((size_t)pairs * taps * 8 + 1, sizeof(int32_t));
  if (!weights) { /* too little memory for the table: the slow path */
    horizontal_generic(src, src_stride, rows, 3, dst, dst_stride, out_width, axis);
    return;
  }
  for (int p = 0; p < pairs; p++)
    for (int side = 0; side < 2; side++)
      for (int t = 0; t < axis->taps[2 * p + side]; t++)
        for (int c = 0; c < 4; c++)
          weights[((size_t)p * taps + t) * 8 + 4 * side + c] =
              axis->weight[(size_t)(2 * p + side) * axis->stride + t];
  for (int y = 0; y < rows; y++) {
    const uint8_t *row = src + (ptrdiff_t)y * src_stride;
    uint8_t *out = dst + (ptrdiff_t)y * dst_stride;
    switch (taps) { /* a constant count unrolls the taps: most crops need 2 to 5 */
      case 2: rgb_pairs_avx2(row, out, pairs, axis->first, weights, 2); break;
      case 3: rgb_pairs_avx2(row, out, pairs, axis->first, weights, 3); break;
      case 4: rgb_pairs_avx2(row, out, pairs, axis->first, weights, 4); break;
      case 5: rgb_pairs_avx2(row, out, pairs, axis->first, weights, 5); break;
      default: rgb_pairs_avx2(row, out, pairs, axis->first, weights, taps); break;
    }
  }
  free(weights);
  int done = 2 * pairs;
  Axis rest = {axis->first + done, axis->taps + done,
               axis->weight + (size_t)done * axis->stride, axis->stride};
  horizontal_generic(src, src_stride, rows, 3, dst + 3 * done, dst_stride, out_width - done,
                     &rest);
}
#endif

/* The two passes' code paths. A call names its own: resize runs with the GIL released,
 * so there is no switch another thread could flip under it. */
typedef struct {
  VerticalFn vertical;
  HorizontalFn horizontal_rgb;
} Kernels;

static const Kernels portable_kernels = {vertical_generic, horizontal_generic};
#ifdef HAVE_X86_DISPATCH
static const Kernels avx2_kernels = {vertical_avx2, horizontal_rgb_avx2};
#endif

/* The fastest this CPU runs: chosen when the module loads (PyInit__resample), only read
 * after. */
static const Kernels *fastest = &portable_kernels;

/* Pillow's two passes, each rounded to uint8, in Pillow's order: horizontal first (over
 * only the input rows the vertical pass reads) unless the height shrinks by more than
 * twice as many pixels as the width (Pillow 13's rule; older Pillow always went
 * horizontal first, which moves some pixels by one level). A pass is skipped where
 * Pillow skips it. */
static int resize(const uint8_t *src, ptrdiff_t src_stride, int height, int width,
                  int channels, const float box[4], uint8_t *dst, ptrdiff_t dst_stride,
                  int out_height, int out_width, const Kernels *kernels) {
  int need_horizontal = out_width != width || box[0] != 0 || box[2] != out_width;
  int need_vertical = out_height != height || box[1] != 0 || box[3] != out_height;
  int horizontal_first =
      !(height - out_height > 0 && height - out_height > (width - out_width) * 2);
  VerticalFn vertical = kernels->vertical;
  HorizontalFn horizontal = channels == 3 ? kernels->horizontal_rgb : horizontal_generic;
  Axis across, down;
  if (make_axis(width, box[0], box[2], out_width, &across)) return -1;
  if (make_axis(height, box[1], box[3], out_height, &down)) {
    free_axis(&across);
    return -1;
  }
  uint8_t *temp = NULL;
  int status = 0;
  if (need_horizontal && need_vertical && horizontal_first) {
    int first_row = down.first[0];
    int rows = down.first[out_height - 1] + down.taps[out_height - 1] - first_row;
    ptrdiff_t temp_stride = (ptrdiff_t)out_width * channels;
    temp = malloc((size_t)temp_stride * rows);
    if (temp) {
      horizontal(src + (ptrdiff_t)first_row * src_stride, src_stride, rows, channels, temp,
                 temp_stride, out_width, &across);
      for (int i = 0; i < out_height; i++) down.first[i] -= first_row;
      vertical(temp, temp_stride, dst, dst_stride, out_width * channels, out_height, &down);
    }
  } else if (need_horizontal && need_vertical) {
    ptrdiff_t temp_stride = (ptrdiff_t)width * channels;
    temp = malloc((size_t)temp_stride * out_height);
    if (temp) {
      vertical(src, src_stride, temp, temp_stride, width * channels, out_height, &down);
      horizontal(temp, temp_stride, out_height, channels, dst, dst_stride, out_width,
                 &across);
    }
  } else if (need_horizontal) {
    horizontal(src, src_stride, height, channels, dst, dst_stride, out_width, &across);
  } else if (need_vertical) {
    vertical(src, src_stride, dst, dst_stride, width * channels, out_height, &down);
  } else {
    for (int y = 0; y < height; y++)
      memcpy(dst + (ptrdiff_t)y * dst_stride, src + (ptrdiff_t)y * src_stride,
             (size_t)width * channels);
  }
  if (need_horizontal && need_vertical && !temp) status = -1;
  free(temp);
  free_axis(&across);
  free_axis(&down);
  return status;
}

/* (height, width, channels, row stride) of a uint8 [H, W] or [H, W, 3] array whose rows
 * may be strided but whose pixels are packed; 0 if it is not one. */
static int image_layout(const Py_buffer *view, const char *name, int *height, int *width,
                        int *channels, ptrdiff_t *row_stride) {
  int ok = view->itemsize == 1 && (view->format == NULL || strcmp(view->format, "B") == 0) &&
           (view->ndim == 2 || (view->ndim == 3 && (view->shape[2] == 1 || view->shape[2] == 3)));
  if (ok) {
    *channels = view->ndim == 3 ? (int)view->shape[2] : 1;
    ok = view->strides[view->ndim - 1] == 1 &&
         (view->ndim == 2 || view->strides[1] == *channels) && view->strides[0] > 0 &&
         view->shape[0] > 0 && view->shape[1] > 0 && view->shape[0] <= INT_MAX &&
         view->shape[1] <= INT_MAX / 3;
  }
  if (!ok) {
    PyErr_Format(PyExc_ValueError,
                 "%s must be a uint8 [H, W] or [H, W, 3] array with packed pixels (rows may "
                 "be strided), at least 1x1", name);
    return 0;
  }
  *height = (int)view->shape[0];
  *width = (int)view->shape[1];
  *row_stride = view->strides[0];
  return 1;
}

/* A ValueError naming the box's numbers: PyErr_Format has no %g (3.12 raises SystemError
 * for it), and snprintf's would take the C locale's decimal mark. */
static void refuse_box(const float box[4], int width, int height) {
  char *text[4] = {NULL, NULL, NULL, NULL};
  int ok = 1;
  for (int i = 0; i < 4 && ok; i++)
    ok = (text[i] = PyOS_double_to_string(box[i], 'g', 6, 0, NULL)) != NULL;
  if (ok)
    PyErr_Format(PyExc_ValueError,
                 "box (%s, %s, %s, %s) must be a non-empty window of the %dx%d image", text[0],
                 text[1], text[2], text[3], width, height);
  for (int i = 0; i < 4; i++) PyMem_Free(text[i]);
}

static PyObject *py_resize(PyObject *self, PyObject *args, PyObject *kwargs) {
  (void)self;
  static char *keywords[] = {"image", "out", "box", "portable", NULL};
  PyObject *src_obj, *dst_obj;
  float box[4];
  int portable = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO(ffff)|p:resize", keywords, &src_obj,
                                   &dst_obj, &box[0], &box[1], &box[2], &box[3], &portable))
    return NULL;
  const Kernels *kernels = portable ? &portable_kernels : fastest;
  Py_buffer src, dst;
  if (PyObject_GetBuffer(src_obj, &src, PyBUF_RECORDS_RO) < 0) return NULL;
  if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_RECORDS) < 0) {
    PyBuffer_Release(&src);
    return NULL;
  }
  PyObject *result = NULL;
  int height, width, channels, out_height, out_width, out_channels;
  ptrdiff_t src_stride, dst_stride;
  if (!image_layout(&src, "the image", &height, &width, &channels, &src_stride) ||
      !image_layout(&dst, "the output", &out_height, &out_width, &out_channels, &dst_stride))
    goto done;
  if (channels != out_channels) {
    PyErr_Format(PyExc_ValueError, "the image has %d channels, the output %d", channels,
                 out_channels);
    goto done;
  }
  if (!(box[0] >= 0 && box[1] >= 0 && box[2] <= width && box[3] <= height &&
        box[2] - box[0] > 0 && box[3] - box[1] > 0)) {
    refuse_box(box, width, height);
    goto done;
  }
  int status;
  Py_BEGIN_ALLOW_THREADS
  status = resize(src.buf, src_stride, height, width, channels, box, dst.buf, dst_stride,
                  out_height, out_width, kernels);
  Py_END_ALLOW_THREADS
  if (status) {
    PyErr_NoMemory();
    goto done;
  }
  result = Py_NewRef(Py_None);
done:
  PyBuffer_Release(&src);
  PyBuffer_Release(&dst);
  return result;
}

static PyObject *py_kernels(PyObject *self, PyObject *args) {
  (void)self;
  (void)args;
  return Py_BuildValue(
      "{s:s,s:s}", "vertical",
      fastest->vertical == vertical_generic ? "portable" : "avx2", "horizontal_rgb",
      fastest->horizontal_rgb == horizontal_generic ? "portable" : "avx2");
}

static PyMethodDef methods[] = {
    {"resize", (PyCFunction)(void (*)(void))py_resize, METH_VARARGS | METH_KEYWORDS,
     "resize(image, out, box, portable=False): out[...] = PIL.Image.fromarray(image).resize(\n"
     "(out width, out height), BILINEAR, box), uint8 [H, W] or [H, W, 3]. portable: run the\n"
     "plain C paths (those of CPUs without AVX2, e.g. ARM) even where AVX2 is, so that a\n"
     "test can check them."},
    {"kernels", py_kernels, METH_NOARGS,
     "The code paths resize runs by default (the fastest this CPU has), by pass."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resample",
                                    "PIL's bilinear resize of uint8 images, to the bit.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__resample(void) {
#ifdef HAVE_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) fastest = &avx2_kernels;
#endif
  return PyModule_Create(&module);
}
