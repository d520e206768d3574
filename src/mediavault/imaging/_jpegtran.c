/*
 * A JPEG's coefficients re-encoded with optimal Huffman tables, as `jpegtran -copy none
 * -optimize` does: libjpeg's transcoding API (jpeg_read_coefficients, then
 * jpeg_write_coefficients), which the TurboJPEG API of libjpeg-turbo 2.1 does not reach.
 * The coefficients are the input's, so the output decodes to exactly its pixels.
 *
 * A sequential output's tables are counted here, from the coefficients in memory, and
 * handed to libjpeg, which then encodes once: its own optimisation encodes twice, the
 * first time only to count symbols, a branch per coefficient, the largest part of the
 * transcode (bench/README.md, lossless_display). For a flipped picture or one of fewer than
 * MIN_SAMPLED_MCU_ROWS MCU rows the file is byte for byte jpegtran's (the tests compare
 * them); another's AC symbols are counted in every SAMPLE_STEP-th MCU row only (see
 * install_optimal_tables). A progressive output's tables, one set per scan, are libjpeg's own.
 *
 * Optionally the picture is flipped top to bottom on the way, in the coefficients: block
 * rows in reverse order, the odd vertical frequencies negated. That is jpegtran's
 * `-flip vertical -perfect`; lossless.py says when it decodes to exactly the flipped pixels.
 *
 * optimize_and_decode also decodes the picture, scaled, from the same decompression
 * (buffered-image mode, jdtrans.c: the coefficient arrays can be read after an output pass),
 * as Pillow decodes it after draft(): the smaller variants' pixels without decoding the
 * file's Huffman codes a second time.
 *
 * libjpeg reports errors by calling exit() unless told otherwise: here every error and
 * every warning (a truncated or damaged file) longjmps back and becomes a Python
 * exception. The work runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* libjpeg's own, exported from its Huffman encoder (jchuff.c) but declared only in its
 * private jchuff.h: the optimal table for a count of each of the 256 symbols. */
void jpeg_gen_optimal_table(j_compress_ptr cinfo, JHUFF_TBL *htbl, long freq[]);

/* As TurboJPEG's TJFLAG_LIMITSCANS: a progressive file of more scans is a known way to burn CPU. */
#define MAX_SCANS 500

static PyObject *JpegError;

struct failure {
    struct jpeg_error_mgr manager;
    jmp_buf jump;
    int out_of_memory;
    char message[JMSG_LENGTH_MAX];
};

static void
fail(j_common_ptr cinfo)
{
    struct failure *failure = (struct failure *)cinfo->err;
    failure->out_of_memory = cinfo->err->msg_code == JERR_OUT_OF_MEMORY;
    (*cinfo->err->format_message)(cinfo, failure->message);
    longjmp(failure->jump, 1);
}

static void
fail_on_warning(j_common_ptr cinfo, int level)
{
    if (level < 0)
        fail(cinfo);
}

static void
fail_with(j_common_ptr cinfo, const char *message)
{
    struct failure *failure = (struct failure *)cinfo->err;
    snprintf(failure->message, sizeof failure->message, "%s", message);
    longjmp(failure->jump, 1);
}

static void
limit_scans(j_common_ptr cinfo)
{
    if (cinfo->is_decompressor && ((j_decompress_ptr)cinfo)->input_scan_number > MAX_SCANS)
        fail_with(cinfo, "more than 500 scans");
}

/* A growing malloc'd buffer the caller owns even when libjpeg fails half way
 * (jpeg_mem_dest keeps its reallocated buffer to itself until the end). */
struct output {
    struct jpeg_destination_mgr manager;
    JOCTET *data;
    size_t capacity;
};

static void
start_output(j_compress_ptr cinfo)
{
    (void)cinfo;
}

static boolean
grow_output(j_compress_ptr cinfo)
{
    struct output *out = (struct output *)cinfo->dest;
    JOCTET *larger = realloc(out->data, out->capacity * 2);
    if (larger == NULL)
        ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 0);
    out->manager.next_output_byte = larger + out->capacity;
    out->manager.free_in_buffer = out->capacity;
    out->data = larger;
    out->capacity *= 2;
    return TRUE;
}

static void
end_output(j_compress_ptr cinfo)
{
    (void)cinfo;
}

static void
reset_output(struct output *out)
{
    out->manager.next_output_byte = out->data;
    out->manager.free_in_buffer = out->capacity;
}

/* Block rows in reverse order, odd vertical frequencies negated: the picture upside down.
 * The caller has checked that every component's blocks fill whole MCU rows, and the
 * arrays are wholly in memory (no max_memory_to_use), so two rows can be held at once. */
static void
flip_vertical(j_decompress_ptr src, jvirt_barray_ptr *coefficients)
{
    for (int c = 0; c < src->num_components; c++) {
        JDIMENSION rows = src->comp_info[c].height_in_blocks, columns = src->comp_info[c].width_in_blocks;
        for (JDIMENSION top = 0; top < (rows + 1) / 2; top++) {
            JDIMENSION bottom = rows - 1 - top;
            JBLOCKROW upper = (*src->mem->access_virt_barray)((j_common_ptr)src, coefficients[c], top, 1, TRUE)[0];
            JBLOCKROW lower = (*src->mem->access_virt_barray)((j_common_ptr)src, coefficients[c], bottom, 1, TRUE)[0];
            for (JDIMENSION x = 0; x < columns; x++) {
                for (int k = 0; k < DCTSIZE2; k++) {
                    int sign = (k / DCTSIZE) % 2 ? -1 : 1;
                    JCOEF a = upper[x][k], b = lower[x][k];
                    upper[x][k] = (JCOEF)(sign * b);
                    if (bottom != top)
                        lower[x][k] = (JCOEF)(sign * a);
                }
            }
        }
    }
}

/* The zigzag position of each coefficient in natural (row-major) order, and back. */
static const int natural_order[DCTSIZE2] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,  12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6,  7,  14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23,
    30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
};
static int zigzag_position[DCTSIZE2];

/* As libjpeg's jchuff.c: magnitudes of more bits than these are not baseline JPEG. */
#define MAX_DC_BITS 11
#define MAX_AC_BITS 10

static inline int
magnitude_bits(int value)
{
    unsigned magnitude = (unsigned)(value < 0 ? -value : value);
    return magnitude ? 32 - __builtin_clz(magnitude) : 0;
}

/* zigzag_bits[r][m]: the zigzag-order bits of the coefficients of row r (natural order)
 * whose columns are the bits of m. */
static uint64_t zigzag_bits[DCTSIZE][256];

static void
make_zigzag_bits(void)
{
    for (int k = 0; k < DCTSIZE2; k++)
        zigzag_position[natural_order[k]] = k;
    for (int row = 0; row < DCTSIZE; row++)
        for (int mask = 0; mask < 256; mask++) {
            uint64_t bits = 0;
            for (int column = 0; column < DCTSIZE; column++)
                if (mask & (1 << column))
                    bits |= (uint64_t)1 << zigzag_position[row * DCTSIZE + column];
            zigzag_bits[row][mask] = bits;
        }
}

/* Bit k set when the block's coefficient k in zigzag order is not zero. */
static inline uint64_t
nonzero_in_zigzag_order(const JCOEF *block)
{
    uint64_t zigzag = 0;
#ifdef __SSE2__
    const __m128i zero = _mm_setzero_si128();
    for (int i = 0; i < 4; i++) {
        __m128i a = _mm_cmpeq_epi16(_mm_loadu_si128((const __m128i *)(block + 16 * i)), zero);
        __m128i b = _mm_cmpeq_epi16(_mm_loadu_si128((const __m128i *)(block + 16 * i + 8)), zero);
        unsigned nonzero = ~(unsigned)_mm_movemask_epi8(_mm_packs_epi16(a, b));
        zigzag |= zigzag_bits[2 * i][nonzero & 0xFF] | zigzag_bits[2 * i + 1][(nonzero >> 8) & 0xFF];
    }
#else
    for (int row = 0; row < DCTSIZE; row++) {
        unsigned nonzero = 0;
        for (int column = 0; column < DCTSIZE; column++)
            nonzero |= (unsigned)(block[row * DCTSIZE + column] != 0) << column;
        zigzag |= zigzag_bits[row][nonzero];
    }
#endif
    return zigzag;
}

/* Counts the block's DC symbol, its difference from the DC before it in the scan, and
 * makes it the one the next block's differs from. -1 when the difference is out of baseline
 * range. */
static inline int
count_dc(const JCOEF *block, int *last_dc, long dc[257])
{
    int bits = magnitude_bits(block[0] - *last_dc);
    if (bits > MAX_DC_BITS)
        return -1;
    dc[bits]++;
    *last_dc = block[0];
    return 0;
}

/* Counts the Huffman symbols the sequential encoder will write for one block, as libjpeg's
 * gathering pass (htest_one_block) does, visiting only its nonzero coefficients. -1 when a
 * coefficient is out of baseline range, where libjpeg stops too. */
static int
count_block(const JCOEF *block, int *last_dc, long dc[257], long ac[257])
{
    if (count_dc(block, last_dc, dc) < 0)
        return -1;
    uint64_t zigzag = nonzero_in_zigzag_order(block) & ~(uint64_t)1;
    int previous = 0;
    while (zigzag) {
        int k = __builtin_ctzll(zigzag);
        zigzag &= zigzag - 1;
        int run = k - previous - 1;
        for (; run > 15; run -= 16)
            ac[0xF0]++;
        int bits = magnitude_bits(block[natural_order[k]]);
        if (bits > MAX_AC_BITS)
            return -1;
        ac[(run << 4) + bits]++;
        previous = k;
    }
    if (previous < DCTSIZE2 - 1)
        ac[0]++;
    return 0;
}

/* Whether every AC coefficient of the block has at most MAX_AC_BITS bits: libjpeg's SIMD
 * Huffman encoder does not check, and would write a symbol the tables have no code for. */
static inline int
ac_in_baseline_range(const JCOEF *block)
{
#ifdef __SSE2__
    /* |v| <= 1023 exactly when v + 1023, as unsigned, is at most 2046. */
    const __m128i bias = _mm_set1_epi16(1023), limit = _mm_set1_epi16(2046);
    const __m128i not_dc = _mm_set_epi16(-1, -1, -1, -1, -1, -1, -1, 0);
    __m128i over = _mm_and_si128(not_dc, _mm_subs_epu16(_mm_add_epi16(_mm_loadu_si128((const __m128i *)block), bias), limit));
    for (int i = 1; i < DCTSIZE2 / 8; i++) {
        __m128i v = _mm_loadu_si128((const __m128i *)(block + 8 * i));
        over = _mm_or_si128(over, _mm_subs_epu16(_mm_add_epi16(v, bias), limit));
    }
    return _mm_movemask_epi8(_mm_cmpeq_epi16(over, _mm_setzero_si128())) == 0xFFFF;
#else
    for (int k = 1; k < DCTSIZE2; k++)
        if (magnitude_bits(block[k]) > MAX_AC_BITS)
            return 0;
    return 1;
#endif
}

/* In an MCU row whose AC symbols are not counted: the block's DC symbol counted as
 * count_block counts it, its AC coefficients only checked. -1 out of baseline range. */
static inline int
count_dc_only(const JCOEF *block, int *last_dc, long dc[257])
{
    return count_dc(block, last_dc, dc) == 0 && ac_in_baseline_range(block) ? 0 : -1;
}

/* A picture of at least MIN_SAMPLED_MCU_ROWS MCU rows has the AC symbols of every
 * SAMPLE_STEP-th row counted (each count then weighs SAMPLE_STEP), and every legal AC
 * symbol one count more, so that whatever the other rows hold has a code. Counting is
 * most of what the optimal tables cost; on the corpus photos so sampled the tables write
 * 0.05-0.11% more bytes than the optimal ones (bench/README.md, lossless_display). The DC
 * symbols, one per block, are all counted. A smaller picture is counted whole: it costs
 * less, and the codes of the symbols it may not hold, a hundred bytes or so of tables,
 * would outweigh what optimal tables save on a photo whose own are nearly optimal. So is a
 * flipped one: its display must not be larger than the original less its metadata, and
 * unlike an upright one it has no stripped original to fall back on (lossless.py). */
#define SAMPLE_STEP 8
#define MIN_SAMPLED_MCU_ROWS 128

/* The Huffman tables of the one interleaved scan a sequential `dst` will write, optimal for
 * the symbols counted, installed in dst so that libjpeg encodes once, with them, instead
 * of gathering its own statistics in a pass of its own. Blocks are visited in the scan's
 * MCU order, the order the DC predictions run in; the dummy blocks libjpeg pads an edge
 * MCU with (DC the previous block's, AC zero: jctrans.c) count as a zero DC difference and
 * an end of block. Every coefficient is checked: -1 when one is out of baseline range.
 * `sampled`: whether a picture of MIN_SAMPLED_MCU_ROWS or more may have its AC symbols
 * counted in every SAMPLE_STEP-th row only. */
static int
install_optimal_tables(j_decompress_ptr src, j_compress_ptr dst, jvirt_barray_ptr *coefficients, int sampled)
{
    long dc[NUM_HUFF_TBLS][257], ac[NUM_HUFF_TBLS][257];
    int last_dc[MAX_COMPONENTS] = {0};
    memset(dc, 0, sizeof dc);
    memset(ac, 0, sizeof ac);
    int max_h = src->max_h_samp_factor, max_v = src->max_v_samp_factor;
    JDIMENSION mcu_columns = (src->image_width + DCTSIZE * max_h - 1) / (DCTSIZE * max_h);
    JDIMENSION mcu_rows = (src->image_height + DCTSIZE * max_v - 1) / (DCTSIZE * max_v);
    JDIMENSION step = sampled && mcu_rows >= MIN_SAMPLED_MCU_ROWS ? SAMPLE_STEP : 1;
    for (JDIMENSION mcu_row = 0; mcu_row < mcu_rows; mcu_row++) {
        int counted = mcu_row % step == 0;
        JBLOCKARRAY rows[MAX_COMPONENTS];
        for (int c = 0; c < src->num_components; c++) {
            jpeg_component_info *component = &src->comp_info[c];
            rows[c] = (*src->mem->access_virt_barray)((j_common_ptr)src, coefficients[c],
                                                      mcu_row * component->v_samp_factor,
                                                      component->v_samp_factor, FALSE);
        }
        for (JDIMENSION mcu_column = 0; mcu_column < mcu_columns; mcu_column++) {
            for (int c = 0; c < src->num_components; c++) {
                jpeg_component_info *component = &src->comp_info[c];
                long *dc_counts = dc[dst->comp_info[c].dc_tbl_no], *ac_counts = ac[dst->comp_info[c].ac_tbl_no];
                for (int y = 0; y < component->v_samp_factor; y++) {
                    JDIMENSION row = mcu_row * component->v_samp_factor + y;
                    for (int x = 0; x < component->h_samp_factor; x++) {
                        JDIMENSION column = mcu_column * component->h_samp_factor + x;
                        if (row < component->height_in_blocks && column < component->width_in_blocks) {
                            const JCOEF *block = rows[c][y][column];
                            if ((counted ? count_block(block, &last_dc[c], dc_counts, ac_counts)
                                         : count_dc_only(block, &last_dc[c], dc_counts)) < 0)
                                return -1;
                        }
                        else {
                            dc_counts[0]++;
                            ac_counts[0] += counted;
                        }
                    }
                }
            }
        }
    }
    if (step > 1)
        for (int t = 0; t < NUM_HUFF_TBLS; t++) {
            for (int symbol = 0; symbol < 256; symbol++)
                ac[t][symbol] *= step;
            ac[t][0x00]++;
            ac[t][0xF0]++;
            for (int run = 0; run < 16; run++)
                for (int bits = 1; bits <= MAX_AC_BITS; bits++)
                    ac[t][(run << 4) + bits]++;
        }
    /* Components sharing a table share its counts: each table is made once. */
    int made[2][NUM_HUFF_TBLS] = {{0}};
    for (int c = 0; c < dst->num_components; c++) {
        int numbers[2] = {dst->comp_info[c].dc_tbl_no, dst->comp_info[c].ac_tbl_no};
        JHUFF_TBL **tables[2] = {&dst->dc_huff_tbl_ptrs[numbers[0]], &dst->ac_huff_tbl_ptrs[numbers[1]]};
        long *counts[2] = {dc[numbers[0]], ac[numbers[1]]};
        for (int i = 0; i < 2; i++) {
            if (made[i][numbers[i]])
                continue;
            made[i][numbers[i]] = 1;
            if (*tables[i] == NULL)
                *tables[i] = jpeg_alloc_huff_table((j_common_ptr)dst);
            jpeg_gen_optimal_table(dst, *tables[i], counts[i]);
        }
    }
    return 0;
}

/* Whether every coefficient of every component was sent to its last bit. When one was
 * not, libjpeg smooths the blocks of a progressive file as it decodes them, which it
 * would not do for the complete re-encode: the pixels would differ. */
static int
complete(j_decompress_ptr src)
{
    if (!src->progressive_mode)
        return 1;
    for (int c = 0; c < src->num_components; c++)
        for (int k = 0; k < DCTSIZE2; k++)
            if (src->coef_bits[c][k] != 0)
                return 0;
    return 1;
}

struct job {
    const JOCTET *input;
    size_t input_size;
    unsigned long long max_pixels;
    int flip;
    int progressive;
    /* When scale is not 0, the picture is also decoded, at 1/scale, into pixels. */
    int scale;
    JSAMPLE *pixels;
    size_t pixels_size;
    struct output out;
    size_t out_size;
    struct failure failure;
};

/* The picture decoded to RGB at 1/job->scale into job->pixels, upside down when job->flip,
 * with the settings Pillow's JPEG decoder uses after draft() (libjpeg's defaults: islow IDCT,
 * fancy upsampling, block smoothing), so the pixels are the ones Pillow would decode. The
 * decompression is in buffered-image mode: the coefficients it absorbs stay in memory for
 * jpeg_read_coefficients, which returns them after this (jdtrans.c), so the file is
 * entropy-decoded once for both. */
static void
decode_scaled(j_decompress_ptr src, struct job *job)
{
    src->buffered_image = TRUE;
    src->out_color_space = JCS_RGB;
    src->scale_num = 1;
    src->scale_denom = (unsigned int)job->scale;
    jpeg_calc_output_dimensions(src);
    size_t stride = (size_t)src->output_width * 3;
    if (src->output_components != 3 || stride * src->output_height != job->pixels_size)
        fail_with((j_common_ptr)src, "the pixel buffer is not the scaled picture's size");
    jpeg_start_decompress(src);
    int status;
    do {
        limit_scans((j_common_ptr)src);
        status = jpeg_consume_input(src);
    } while (status != JPEG_REACHED_EOI && status != JPEG_SUSPENDED);
    if (status == JPEG_SUSPENDED)
        fail_with((j_common_ptr)src, "the input ends before its EOI");
    if (!complete(src))
        fail_with((j_common_ptr)src, "a progressive file whose scans leave coefficients unfinished");
    jpeg_start_output(src, src->input_scan_number);
    while (src->output_scanline < src->output_height) {
        JSAMPROW rows[4];
        JDIMENSION first = src->output_scanline, count = src->output_height - first;
        if (count > 4)
            count = 4;
        for (JDIMENSION i = 0; i < count; i++) {
            JDIMENSION y = first + i;
            rows[i] = job->pixels + stride * (job->flip ? src->output_height - 1 - y : y);
        }
        jpeg_read_scanlines(src, rows, count);
    }
    jpeg_finish_output(src);
}

/* Runs without the GIL; 0 with job->out holding the JPEG, -1 with job->failure's message. */
static int
transcode(struct job *job)
{
    struct jpeg_decompress_struct src, scaled;
    struct jpeg_compress_struct dst;
    struct jpeg_progress_mgr progress = {.progress_monitor = limit_scans};
    volatile int dst_created = 0, scaled_created = 0;

    src.err = jpeg_std_error(&job->failure.manager);
    job->failure.manager.error_exit = fail;
    job->failure.manager.emit_message = fail_on_warning;
    if (setjmp(job->failure.jump)) {
        if (dst_created)
            jpeg_destroy_compress(&dst);
        if (scaled_created)
            jpeg_destroy_decompress(&scaled);
        jpeg_destroy_decompress(&src);
        return -1;
    }
    jpeg_create_decompress(&src);
    src.progress = &progress;
    jpeg_mem_src(&src, job->input, (unsigned long)job->input_size);
    jpeg_read_header(&src, TRUE);
    if ((unsigned long long)src.image_width * src.image_height > job->max_pixels)
        fail_with((j_common_ptr)&src, "more pixels than the limit");
    if (src.num_components != 3 || src.jpeg_color_space != JCS_YCbCr || src.data_precision != 8)
        fail_with((j_common_ptr)&src, "not an 8-bit three-component YCbCr JPEG");
    if (job->flip && src.image_height % (DCTSIZE * src.max_v_samp_factor) != 0)
        fail_with((j_common_ptr)&src, "its height is not a whole number of MCU rows");
    if (job->scale == 8 && !src.progressive_mode) {
        /* At 1/8 the sequential decoder decodes the AC coefficients but keeps none (jdhuff.c):
         * the picture comes from a decompression of its own, the file decoded twice. */
        scaled.err = &job->failure.manager;
        jpeg_create_decompress(&scaled);
        scaled_created = 1;
        scaled.progress = &progress;
        jpeg_mem_src(&scaled, job->input, (unsigned long)job->input_size);
        jpeg_read_header(&scaled, TRUE);
        decode_scaled(&scaled, job);
        jpeg_destroy_decompress(&scaled);
        scaled_created = 0;
    }
    else if (job->scale)
        decode_scaled(&src, job);
    jvirt_barray_ptr *coefficients = jpeg_read_coefficients(&src);
    if (!complete(&src))
        fail_with((j_common_ptr)&src, "a progressive file whose scans leave coefficients unfinished");
    if (job->flip)
        flip_vertical(&src, coefficients);

    dst.err = &job->failure.manager;
    jpeg_create_compress(&dst);
    dst_created = 1;
    dst.dest = &job->out.manager;
    job->out.manager.init_destination = start_output;
    job->out.manager.empty_output_buffer = grow_output;
    job->out.manager.term_destination = end_output;
    reset_output(&job->out);
    jpeg_copy_critical_parameters(&src, &dst);
    /* No APP0 (JFIF) nor APP14 (Adobe): the display carries no metadata at all. */
    dst.write_JFIF_header = FALSE;
    dst.write_Adobe_marker = FALSE;
    if (job->progressive) {
        /* A scan script of ten scans, each with tables of its own: libjpeg gathers them. */
        dst.optimize_coding = TRUE;
        jpeg_simple_progression(&dst);
    }
    else if (install_optimal_tables(&src, &dst, coefficients, !job->flip) < 0)
        fail_with((j_common_ptr)&src, "a coefficient out of baseline range");
    jpeg_write_coefficients(&dst, coefficients);
    jpeg_finish_compress(&dst);
    job->out_size = job->out.capacity - job->out.manager.free_in_buffer;
    jpeg_destroy_compress(&dst);
    jpeg_finish_decompress(&src);
    jpeg_destroy_decompress(&src);
    return 0;
}

/* Transcodes job (its input, output and pixels set) without the GIL; its output as bytes. */
static PyObject *
run(struct job *job)
{
    /* Optimal tables rarely grow a file: a little over the input is enough most times. */
    job->out.capacity = job->input_size + job->input_size / 8 + 4096;
    job->out.data = malloc(job->out.capacity);
    if (job->out.data == NULL)
        return PyErr_NoMemory();
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = transcode(job);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (status == 0)
        result = PyBytes_FromStringAndSize((const char *)job->out.data, (Py_ssize_t)job->out_size);
    else if (job->failure.out_of_memory)
        PyErr_NoMemory();
    else
        PyErr_SetString(JpegError, job->failure.message);
    free(job->out.data);
    return result;
}

static PyObject *
optimize(PyObject *self, PyObject *args)
{
    Py_buffer input;
    unsigned long long max_pixels;
    int flip, progressive;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Kpp", &input, &max_pixels, &flip, &progressive))
        return NULL;
    struct job job = {
        .input = input.buf, .input_size = (size_t)input.len, .max_pixels = max_pixels, .flip = flip,
        .progressive = progressive,
    };
    PyObject *result = run(&job);
    PyBuffer_Release(&input);
    return result;
}

static PyObject *
optimize_and_decode(PyObject *self, PyObject *args)
{
    Py_buffer input, pixels;
    unsigned long long max_pixels;
    int flip, progressive, scale;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Kppiw*", &input, &max_pixels, &flip, &progressive, &scale, &pixels))
        return NULL;
    PyObject *result = NULL;
    if (scale != 1 && scale != 2 && scale != 4 && scale != 8)
        PyErr_SetString(PyExc_ValueError, "scale must be 1, 2, 4 or 8");
    else {
        struct job job = {
            .input = input.buf, .input_size = (size_t)input.len, .max_pixels = max_pixels, .flip = flip,
            .progressive = progressive, .scale = scale, .pixels = pixels.buf, .pixels_size = (size_t)pixels.len,
        };
        result = run(&job);
    }
    PyBuffer_Release(&pixels);
    PyBuffer_Release(&input);
    return result;
}

static PyMethodDef methods[] = {
    {"optimize", optimize, METH_VARARGS,
     "optimize(jpeg, max_pixels, flip, progressive) -> bytes\n\n"
     "The JPEG's coefficients re-encoded with optimised Huffman tables and no metadata segment,\n"
     "sequential or progressive (libjpeg's simple progression), flipped top to bottom when `flip`.\n"
     "Raises JpegError on any libjpeg error or warning, on more than max_pixels pixels, on\n"
     "anything but an 8-bit three-component YCbCr JPEG, and when `flip` and its height is not a\n"
     "whole number of MCU rows."},
    {"optimize_and_decode", optimize_and_decode, METH_VARARGS,
     "optimize_and_decode(jpeg, max_pixels, flip, progressive, scale, pixels) -> bytes\n\n"
     "optimize(jpeg, max_pixels, flip, progressive), and the picture decoded from the same\n"
     "coefficients as Pillow decodes it after draft() picked this scale (1, 2, 4 or 8): RGB at\n"
     "1/scale, flipped top to bottom when `flip`, into `pixels`, a writable buffer of exactly\n"
     "ceil(width / scale) * ceil(height / scale) * 3 bytes. The file is entropy-decoded once."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegtran", "libjpeg's lossless transcoding (see the source's header).", -1, methods,
};

PyMODINIT_FUNC
PyInit__jpegtran(void)
{
    make_zigzag_bits();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    JpegError = PyErr_NewException("mediavault.imaging._jpegtran.JpegError", NULL, NULL);
    if (PyModule_AddObject(m, "JpegError", JpegError) < 0) {
        Py_XDECREF(JpegError);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
