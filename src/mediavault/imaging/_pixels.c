/*
 * Loops over 8-bit pixels that Pillow can only do in several passes, or Python slowly.
 *
 * half_ycbcr: luma box-averaged 2x2 and interleaved with the 4:2:0 chroma planes into
 * one 4-byte-per-pixel "YCbCr" picture at the chroma's resolution. Pillow needs a
 * reduce(), a merge() and two intermediate images for it: 4.2 ms on an 8 MP photo,
 * about 2 ms here, in one pass.
 *
 * orient: one plane turned or flipped as Image.transpose(method) would, straight into
 * the bytes the encoder reads, in 16x16 blocks turned in SSE2 registers. Pillow's
 * transpose() plus tobytes() took 6-7 ms on a 7 MP luma plane, this 0.2-0.7 ms.
 *
 * halve: a chroma plane box-averaged to half width, half height or both, as
 * Image.reduce() does, straight into bytes: 4:4:4, 4:2:2 and 4:4:0 chroma to 4:2:0.
 *
 * The plane loops give exactly Pillow's results (the tests compare them); all release the GIL.
 *
 * thumbhash: the ThumbHash of up to 100x100 RGBA pixels (see thumbhash.py), the same
 * bytes as the encoder written out in Python that it replaced (tests/imaging compares
 * them): every sum is taken in the same order, each product and quotient in the same
 * grouping, and nothing is fused (setup.py builds with -ffp-contract=off), so each double
 * is the one Python computed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Pillow's Image.Transpose values. */
enum { FLIP_LEFT_RIGHT, FLIP_TOP_BOTTOM, ROTATE_90, ROTATE_180, ROTATE_270, TRANSPOSE, TRANSVERSE };

/* The quarter turns and the two diagonal flips: rows become columns. */
static inline int
swaps_axes(int method)
{
    return method == ROTATE_90 || method == ROTATE_270 || method == TRANSPOSE || method == TRANSVERSE;
}

#ifdef __SSE2__
#include <emmintrin.h>

/* Rows first[0], first[step], ... first[15 * step] in, their 16 columns out: four rounds
 * of interleaving bytes, then pairs, quads and eights of them. About six times faster
 * than moving byte by byte. (No SSE2, as on ARM: the byte loop does it all.) */
static inline void
transpose16(const uint8_t *first, Py_ssize_t step, __m128i column[16])
{
    __m128i a[16], b[16];
    for (int i = 0; i < 16; i++)
        a[i] = _mm_loadu_si128((const __m128i *)(first + i * step));
    for (int i = 0; i < 8; i++) {
        b[2 * i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
        b[2 * i + 1] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        a[4 * i] = _mm_unpacklo_epi16(b[4 * i], b[4 * i + 2]);
        a[4 * i + 1] = _mm_unpackhi_epi16(b[4 * i], b[4 * i + 2]);
        a[4 * i + 2] = _mm_unpacklo_epi16(b[4 * i + 1], b[4 * i + 3]);
        a[4 * i + 3] = _mm_unpackhi_epi16(b[4 * i + 1], b[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            b[8 * i + 2 * j] = _mm_unpacklo_epi32(a[8 * i + j], a[8 * i + j + 4]);
            b[8 * i + 2 * j + 1] = _mm_unpackhi_epi32(a[8 * i + j], a[8 * i + j + 4]);
        }
    for (int j = 0; j < 8; j++) {
        column[2 * j] = _mm_unpacklo_epi64(b[j], b[j + 8]);
        column[2 * j + 1] = _mm_unpackhi_epi64(b[j], b[j + 8]);
    }
}

/* The 16 bytes in reverse order: dwords, then words in each dword, then bytes in each word. */
static inline __m128i
reversed16(__m128i v)
{
    v = _mm_shuffle_epi32(v, _MM_SHUFFLE(0, 1, 2, 3));
    v = _mm_shufflelo_epi16(v, _MM_SHUFFLE(2, 3, 0, 1));
    v = _mm_shufflehi_epi16(v, _MM_SHUFFLE(2, 3, 0, 1));
    return _mm_or_si128(_mm_slli_epi16(v, 8), _mm_srli_epi16(v, 8));
}
#endif

static int
check_plane(const Py_buffer *view, const char *name, Py_ssize_t stride, Py_ssize_t width, Py_ssize_t height)
{
    if (width < 1 || height < 1 || stride < width) {
        PyErr_Format(PyExc_ValueError, "%s: need 1 <= width <= stride and height >= 1", name);
        return -1;
    }
    if (view->len < stride * (height - 1) + width) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is too short for %zdx%zd with stride %zd",
                     name, view->len, width, height, stride);
        return -1;
    }
    return 0;
}

static void
half_rows(const uint8_t *restrict y, Py_ssize_t y_stride, Py_ssize_t width, Py_ssize_t height,
          const uint8_t *restrict cb, const uint8_t *restrict cr, Py_ssize_t c_stride,
          uint8_t *restrict luma, uint8_t *restrict out)
{
    Py_ssize_t half_width = (width + 1) / 2, half_height = (height + 1) / 2, pairs = width / 2;
    for (Py_ssize_t j = 0; j < half_height; j++) {
        const uint8_t *top = y + 2 * j * y_stride;
        /* An odd last row or column is averaged over the samples there are, as Pillow's reduce() does. */
        const uint8_t *bottom = 2 * j + 1 < height ? top + y_stride : top;
        for (Py_ssize_t i = 0; i < pairs; i++)
            luma[i] = (uint8_t)((top[2 * i] + top[2 * i + 1] + bottom[2 * i] + bottom[2 * i + 1] + 2) >> 2);
        if (half_width > pairs)
            luma[pairs] = (uint8_t)((top[width - 1] + bottom[width - 1] + 1) >> 1);
        const uint8_t *b = cb + j * c_stride, *r = cr + j * c_stride;
        uint8_t *row = out + j * half_width * 4;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        /* One 32-bit store per pixel, which the compiler vectorises; byte stores it does not. */
        for (Py_ssize_t i = 0; i < half_width; i++) {
            uint32_t pixel = (uint32_t)luma[i] | (uint32_t)b[i] << 8 | (uint32_t)r[i] << 16 | 0xFF000000u;
            memcpy(row + 4 * i, &pixel, 4);
        }
#else
        for (Py_ssize_t i = 0; i < half_width; i++) {
            row[4 * i] = luma[i];
            row[4 * i + 1] = b[i];
            row[4 * i + 2] = r[i];
            row[4 * i + 3] = 255;
        }
#endif
    }
}

static PyObject *
half_ycbcr(PyObject *module, PyObject *args)
{
    Py_buffer y, cb, cr;
    Py_ssize_t y_stride, width, height, c_stride;
    if (!PyArg_ParseTuple(args, "y*nnny*y*n", &y, &y_stride, &width, &height, &cb, &cr, &c_stride))
        return NULL;
    PyObject *result = NULL;
    uint8_t *luma = NULL;
    Py_ssize_t half_width = (width + 1) / 2, half_height = (height + 1) / 2;
    if (check_plane(&y, "y", y_stride, width, height) == 0 &&
        check_plane(&cb, "cb", c_stride, half_width, half_height) == 0 &&
        check_plane(&cr, "cr", c_stride, half_width, half_height) == 0 &&
        (luma = PyMem_RawMalloc((size_t)half_width)) != NULL &&
        (result = PyBytes_FromStringAndSize(NULL, half_width * half_height * 4)) != NULL) {
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
        Py_BEGIN_ALLOW_THREADS
        half_rows(y.buf, y_stride, width, height, cb.buf, cr.buf, c_stride, luma, out);
        Py_END_ALLOW_THREADS
    }
    else if (luma == NULL && !PyErr_Occurred())
        PyErr_NoMemory();
    PyMem_RawFree(luma);
    PyBuffer_Release(&y);
    PyBuffer_Release(&cb);
    PyBuffer_Release(&cr);
    return result;
}

static void
orient_plane(const uint8_t *restrict src, Py_ssize_t width, Py_ssize_t height, Py_ssize_t stride, int method,
             uint8_t *restrict dst, Py_ssize_t out_stride)
{
    int swap = swaps_axes(method);
    /* Where source (x, y) lands: (u, v) = swap ? (y, x) : (x, y), then mirrored as flagged. */
    int flip_u = method == FLIP_LEFT_RIGHT || method == ROTATE_180 || method == ROTATE_270 || method == TRANSVERSE;
    int flip_v = method == FLIP_TOP_BOTTOM || method == ROTATE_180 || method == ROTATE_90 || method == TRANSVERSE;
    Py_ssize_t out_width = swap ? height : width, out_height = swap ? width : height;
    if (!swap) {
        for (Py_ssize_t y = 0; y < height; y++) {
            const uint8_t *in = src + y * stride;
            uint8_t *out = dst + (flip_v ? height - 1 - y : y) * out_stride;
            if (flip_u) {
                Py_ssize_t x = 0;
#ifdef __SSE2__
                for (; x + 16 <= width; x += 16)
                    _mm_storeu_si128((__m128i *)(out + width - 16 - x),
                                     reversed16(_mm_loadu_si128((const __m128i *)(in + x))));
#endif
                for (; x < width; x++)
                    out[width - 1 - x] = in[x];
            }
            else
                memcpy(out, in, (size_t)width);
        }
        return;
    }
    Py_ssize_t full_rows = 0, full_columns = 0;
#ifdef __SSE2__
    full_rows = height / 16 * 16;
    full_columns = width / 16 * 16;
    for (Py_ssize_t y0 = 0; y0 < full_rows; y0 += 16) {
        /* Mirroring u is reading the block's rows bottom up; mirroring v is storing
         * its columns to rows counted from the bottom. */
        const uint8_t *first = src + (flip_u ? y0 + 15 : y0) * stride;
        Py_ssize_t step = flip_u ? -stride : stride;
        Py_ssize_t u0 = flip_u ? out_width - 16 - y0 : y0;
        for (Py_ssize_t x0 = 0; x0 < full_columns; x0 += 16) {
            __m128i column[16];
            transpose16(first + x0, step, column);
            for (int c = 0; c < 16; c++) {
                Py_ssize_t x = x0 + c;
                _mm_storeu_si128((__m128i *)(dst + (flip_v ? out_height - 1 - x : x) * out_stride + u0), column[c]);
            }
        }
    }
#endif
    /* What the 16x16 blocks leave: the right strip, then the bottom one. */
    for (Py_ssize_t y = 0; y < height; y++) {
        Py_ssize_t u = flip_u ? out_width - 1 - y : y;
        for (Py_ssize_t x = y < full_rows ? full_columns : 0; x < width; x++)
            dst[(flip_v ? out_height - 1 - x : x) * out_stride + u] = src[y * stride + x];
    }
}

static void
orient_and_pad(const uint8_t *restrict src, Py_ssize_t width, Py_ssize_t height, Py_ssize_t stride, int method,
               uint8_t *restrict dst, Py_ssize_t out_stride)
{
    orient_plane(src, width, height, stride, method, dst, out_stride);
    int swap = swaps_axes(method);
    Py_ssize_t out_width = swap ? height : width, out_height = swap ? width : height;
    /* Each row's last sample repeated to the stride: an encoder reading past the picture
     * sees an edge, not a step. */
    if (out_stride > out_width)
        for (Py_ssize_t v = 0; v < out_height; v++)
            memset(dst + v * out_stride + out_width, dst[v * out_stride + out_width - 1], (size_t)(out_stride - out_width));
}

static PyObject *
orient(PyObject *module, PyObject *args)
{
    Py_buffer plane;
    Py_ssize_t width, height, stride, out_stride = 0;
    int method;
    if (!PyArg_ParseTuple(args, "y*nnni|n", &plane, &width, &height, &stride, &method, &out_stride))
        return NULL;
    PyObject *result = NULL;
    int swap = swaps_axes(method);
    Py_ssize_t out_width = swap ? height : width, out_height = swap ? width : height;
    if (out_stride == 0)
        out_stride = out_width;
    if (method < FLIP_LEFT_RIGHT || method > TRANSVERSE)
        PyErr_Format(PyExc_ValueError, "unknown transpose method %d", method);
    else if (out_stride < out_width)
        PyErr_Format(PyExc_ValueError, "out_stride %zd is narrower than the turned plane (%zd)", out_stride, out_width);
    else if (check_plane(&plane, "plane", stride, width, height) == 0 &&
             (result = PyBytes_FromStringAndSize(NULL, out_stride * out_height)) != NULL) {
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
        Py_BEGIN_ALLOW_THREADS
        orient_and_pad(plane.buf, width, height, stride, method, out, out_stride);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&plane);
    return result;
}

static void
halve_plane(const uint8_t *restrict src, Py_ssize_t width, Py_ssize_t height, Py_ssize_t stride,
            int fx, int fy, uint8_t *restrict dst)
{
    Py_ssize_t out_width = (width + fx - 1) / fx, out_height = (height + fy - 1) / fy;
    for (Py_ssize_t j = 0; j < out_height; j++) {
        const uint8_t *top = src + j * fy * stride;
        /* Past an odd edge the average is over the samples there are, as in Pillow. */
        int rows = fy == 2 && j * 2 + 1 < height ? 2 : 1;
        const uint8_t *bottom = rows == 2 ? top + stride : top;
        uint8_t *out = dst + j * out_width;
        if (fx == 1) {
            for (Py_ssize_t i = 0; i < width; i++)
                out[i] = (uint8_t)((top[i] + bottom[i] + 1) >> 1);
            continue;
        }
        Py_ssize_t pairs = width / 2;
        if (rows == 2)
            for (Py_ssize_t i = 0; i < pairs; i++)
                out[i] = (uint8_t)((top[2 * i] + top[2 * i + 1] + bottom[2 * i] + bottom[2 * i + 1] + 2) >> 2);
        else
            for (Py_ssize_t i = 0; i < pairs; i++)
                out[i] = (uint8_t)((top[2 * i] + top[2 * i + 1] + 1) >> 1);
        if (out_width > pairs)
            out[pairs] = (uint8_t)((top[width - 1] + bottom[width - 1] + 1) >> 1);
    }
}

static PyObject *
halve(PyObject *module, PyObject *args)
{
    Py_buffer plane;
    Py_ssize_t width, height, stride;
    int fx, fy;
    if (!PyArg_ParseTuple(args, "y*nnnii", &plane, &width, &height, &stride, &fx, &fy))
        return NULL;
    PyObject *result = NULL;
    if (fx < 1 || fx > 2 || fy < 1 || fy > 2 || fx * fy == 1)
        PyErr_Format(PyExc_ValueError, "factors must be (1, 2), (2, 1) or (2, 2), not (%d, %d)", fx, fy);
    else if (check_plane(&plane, "plane", stride, width, height) == 0 &&
             (result = PyBytes_FromStringAndSize(NULL, ((width + fx - 1) / fx) * ((height + fy - 1) / fy))) != NULL) {
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
        Py_BEGIN_ALLOW_THREADS
        halve_plane(plane.buf, width, height, stride, fx, fy, out);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&plane);
    return result;
}


/* The reference's rounding (JavaScript's Math.round: halves up). */
static long
round_half_up(double value)
{
    return (long)floor(value + 0.5);
}

/* The most AC terms of one channel: 7 x 7 frequencies keep those with cx * ny < nx * (ny - cy). */
#define THUMBHASH_MAX_AC 48

typedef struct {
    double dc, scale;
    double ac[THUMBHASH_MAX_AC];
    int count;
} channel_terms;

/* DC, AC terms normalised to 0..1 and their scale: the DCT of a width x height channel,
 * separable, each row first summed against each horizontal frequency. `row_sums` holds
 * nx * height doubles, `cosines` max(width, height). */
static void
encode_channel(const double *channel, int width, int height, int nx, int ny, double *row_sums, double *cosines,
               channel_terms *terms)
{
    for (int cx = 0; cx < nx; cx++) {
        for (int x = 0; x < width; x++)
            cosines[x] = cos(Py_MATH_PI / width * cx * (x + 0.5));
        for (int y = 0; y < height; y++) {
            const double *row = channel + (Py_ssize_t)y * width;
            double sum = 0.0;
            for (int x = 0; x < width; x++)
                sum += row[x] * cosines[x];
            row_sums[cx * height + y] = sum;
        }
    }
    terms->dc = 0.0;
    terms->scale = 0.0;
    terms->count = 0;
    for (int cy = 0; cy < ny; cy++) {
        for (int y = 0; y < height; y++)
            cosines[y] = cos(Py_MATH_PI / height * cy * (y + 0.5));
        for (int cx = 0; cx * ny < nx * (ny - cy); cx++) {
            double sum = 0.0;
            for (int y = 0; y < height; y++)
                sum += row_sums[cx * height + y] * cosines[y];
            double f = sum / (double)(width * height);
            if (cx || cy) {
                terms->ac[terms->count++] = f;
                if (fabs(f) > terms->scale)
                    terms->scale = fabs(f);
            }
            else
                terms->dc = f;
        }
    }
    if (terms->scale != 0.0)
        for (int i = 0; i < terms->count; i++)
            terms->ac[i] = 0.5 + 0.5 / terms->scale * terms->ac[i];
}

/* The hash's bytes into `out` (at most 6 + (27 + 5 + 5 + 14 + 1) / 2); returns how many. */
static Py_ssize_t
thumbhash_bytes(const uint8_t *rgba, int width, int height, double *scratch, long *out)
{
    Py_ssize_t count = (Py_ssize_t)width * height;
    double *l = scratch, *p = l + count, *q = p + count, *alpha = q + count;
    double *row_sums = alpha + count, *cosines = row_sums + 7 * 100;
    double total_alpha = 0.0;
    for (Py_ssize_t i = 0; i < count; i++) {
        alpha[i] = rgba[4 * i + 3] / 255.0;
        total_alpha += alpha[i];
    }
    int has_alpha = total_alpha < (double)count;
    double average[3] = {0.0, 0.0, 0.0};
    if (has_alpha && total_alpha != 0.0)
        /* Composited over the picture's average colour, weighted by alpha. */
        for (int c = 0; c < 3; c++) {
            double sum = 0.0;
            for (Py_ssize_t i = 0; i < count; i++)
                sum += alpha[i] * rgba[4 * i + c];
            average[c] = sum / 255.0 / total_alpha;
        }
    for (Py_ssize_t i = 0; i < count; i++) {
        double rgb[3];
        for (int c = 0; c < 3; c++)
            rgb[c] = has_alpha ? average[c] * (1.0 - alpha[i]) + alpha[i] / 255.0 * rgba[4 * i + c]
                               : rgba[4 * i + c] / 255.0;
        l[i] = (rgb[0] + rgb[1] + rgb[2]) / 3.0;
        p[i] = (rgb[0] + rgb[1]) / 2.0 - rgb[2];
        q[i] = rgb[0] - rgb[1];
    }
    int l_limit = has_alpha ? 5 : 7, longest = width > height ? width : height;
    long lx = round_half_up((double)(l_limit * width) / longest), ly = round_half_up((double)(l_limit * height) / longest);
    lx = lx > 1 ? lx : 1;
    ly = ly > 1 ? ly : 1;
    channel_terms terms[4];
    encode_channel(l, width, height, lx > 3 ? (int)lx : 3, ly > 3 ? (int)ly : 3, row_sums, cosines, &terms[0]);
    encode_channel(p, width, height, 3, 3, row_sums, cosines, &terms[1]);
    encode_channel(q, width, height, 3, 3, row_sums, cosines, &terms[2]);
    int landscape = width > height;
    long header24 = round_half_up(63 * terms[0].dc) | round_half_up(31.5 + 31.5 * terms[1].dc) << 6 |
                    round_half_up(31.5 + 31.5 * terms[2].dc) << 12 | round_half_up(31 * terms[0].scale) << 18 |
                    (long)has_alpha << 23;
    long header16 = (landscape ? ly : lx) | round_half_up(63 * terms[1].scale) << 3 |
                    round_half_up(63 * terms[2].scale) << 9 | (long)landscape << 15;
    Py_ssize_t n = 0;
    out[n++] = header24 & 255;
    out[n++] = (header24 >> 8) & 255;
    out[n++] = header24 >> 16;
    out[n++] = header16 & 255;
    out[n++] = header16 >> 8;
    int channels = 3;
    if (has_alpha) {
        encode_channel(alpha, width, height, 5, 5, row_sums, cosines, &terms[3]);
        out[n++] = round_half_up(15 * terms[3].dc) | round_half_up(15 * terms[3].scale) << 4;
        channels = 4;
    }
    long low = -1;
    for (int c = 0; c < channels; c++)
        for (int i = 0; i < terms[c].count; i++) {
            long nibble = round_half_up(15 * terms[c].ac[i]);
            if (low < 0)
                low = nibble;
            else {
                out[n++] = low | nibble << 4;
                low = -1;
            }
        }
    if (low >= 0)
        out[n++] = low;
    return n;
}

static PyObject *
thumbhash(PyObject *module, PyObject *args)
{
    Py_buffer rgba;
    int width, height;
    if (!PyArg_ParseTuple(args, "iiy*", &width, &height, &rgba))
        return NULL;
    PyObject *result = NULL;
    double *scratch = NULL;
    long out[64];
    Py_ssize_t n = 0;
    if (!(0 < width && width <= 100 && 0 < height && height <= 100) || rgba.len != (Py_ssize_t)width * height * 4)
        PyErr_Format(PyExc_ValueError, "%dx%d RGBA with %zd bytes is no picture up to 100x100", width, height, rgba.len);
    else if ((scratch = PyMem_RawMalloc(sizeof(double) * (4 * (size_t)width * height + 7 * 100 + 100))) == NULL)
        PyErr_NoMemory();
    else {
        Py_BEGIN_ALLOW_THREADS
        n = thumbhash_bytes(rgba.buf, width, height, scratch, out);
        Py_END_ALLOW_THREADS
        char bytes[64];
        for (Py_ssize_t i = 0; i < n; i++) {
            if (out[i] < 0 || out[i] > 255) {
                PyErr_SetString(PyExc_ValueError, "bytes must be in range(0, 256)");
                break;
            }
            bytes[i] = (char)out[i];
        }
        if (!PyErr_Occurred())
            result = PyBytes_FromStringAndSize(bytes, n);
    }
    PyMem_RawFree(scratch);
    PyBuffer_Release(&rgba);
    return result;
}

static PyMethodDef methods[] = {
    {"half_ycbcr", half_ycbcr, METH_VARARGS,
     "half_ycbcr(y, y_stride, width, height, cb, cr, c_stride) -> bytes\n\n"
     "Luma box-averaged 2x2 beside the 4:2:0 chroma: ceil(width/2) x ceil(height/2) pixels of\n"
     "Y, Cb, Cr, 255 (Pillow's raw mode YCbCrX)."},
    {"halve", halve, METH_VARARGS,
     "halve(plane, width, height, stride, fx, fy) -> bytes\n\n"
     "An 8-bit plane box-averaged by (fx, fy) in (1, 2), (2, 1) or (2, 2), as Image.reduce((fx, fy)),\n"
     "rows unpadded."},
    {"orient", orient, METH_VARARGS,
     "orient(plane, width, height, stride, method, out_stride=0) -> bytes\n\n"
     "An 8-bit plane as Image.transpose(method) turns it, each row padded to out_stride bytes\n"
     "(0: not padded) with copies of its last sample."},
    {"thumbhash", thumbhash, METH_VARARGS,
     "thumbhash(width, height, rgba) -> bytes\n\n"
     "The ThumbHash of width x height (each 1 to 100) RGBA pixels, as thumbhash.py describes it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pixels", "Loops over 8-bit planes and pixels (see the source's header).", -1, methods,
};

PyMODINIT_FUNC
PyInit__pixels(void)
{
    return PyModule_Create(&module);
}
