/*
 * A JPEG's coefficients re-encoded with optimal Huffman tables, as `jpegtran -copy none
 * -optimize` does: libjpeg's transcoding API (jpeg_read_coefficients, then
 * jpeg_write_coefficients), which the TurboJPEG API of libjpeg-turbo 2.1 does not reach.
 * The coefficients are the input's, so the output decodes to exactly its pixels.
 *
 * Optionally the picture is flipped top to bottom on the way, in the coefficients: block
 * rows in reverse order, the odd vertical frequencies negated. That is jpegtran's
 * `-flip vertical -perfect`; lossless.py says when it decodes to exactly the flipped pixels.
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
    struct output out;
    size_t out_size;
    struct failure failure;
};

/* Runs without the GIL; 0 with job->out holding the JPEG, -1 with job->failure's message. */
static int
transcode(struct job *job)
{
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct jpeg_progress_mgr progress = {.progress_monitor = limit_scans};
    volatile int dst_created = 0;

    src.err = jpeg_std_error(&job->failure.manager);
    job->failure.manager.error_exit = fail;
    job->failure.manager.emit_message = fail_on_warning;
    if (setjmp(job->failure.jump)) {
        if (dst_created)
            jpeg_destroy_compress(&dst);
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
    dst.optimize_coding = TRUE;
    if (job->progressive)
        jpeg_simple_progression(&dst);
    jpeg_write_coefficients(&dst, coefficients);
    jpeg_finish_compress(&dst);
    job->out_size = job->out.capacity - job->out.manager.free_in_buffer;
    jpeg_destroy_compress(&dst);
    jpeg_finish_decompress(&src);
    jpeg_destroy_decompress(&src);
    return 0;
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
    /* Optimal tables rarely grow a file: a little over the input is enough most times. */
    job.out.capacity = (size_t)input.len + (size_t)input.len / 8 + 4096;
    job.out.data = malloc(job.out.capacity);
    if (job.out.data == NULL) {
        PyBuffer_Release(&input);
        return PyErr_NoMemory();
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = transcode(&job);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&input);
    PyObject *result = NULL;
    if (status == 0)
        result = PyBytes_FromStringAndSize((const char *)job.out.data, (Py_ssize_t)job.out_size);
    else if (job.failure.out_of_memory)
        PyErr_NoMemory();
    else
        PyErr_SetString(JpegError, job.failure.message);
    free(job.out.data);
    return result;
}

static PyMethodDef methods[] = {
    {"optimize", optimize, METH_VARARGS,
     "optimize(jpeg, max_pixels, flip, progressive) -> bytes\n\n"
     "The JPEG's coefficients re-encoded with optimal Huffman tables and no metadata segment,\n"
     "sequential or progressive (libjpeg's simple progression), flipped top to bottom when `flip`.\n"
     "Raises JpegError on any libjpeg error or warning, on more than max_pixels pixels, on\n"
     "anything but an 8-bit three-component YCbCr JPEG, and when `flip` and its height is not a\n"
     "whole number of MCU rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegtran", "libjpeg's lossless transcoding (see the source's header).", -1, methods,
};

PyMODINIT_FUNC
PyInit__jpegtran(void)
{
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
