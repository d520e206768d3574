// Uploads a file with tus-js-client under Node; prints one JSON line and exits 0 on success.
//   node tus_client.cjs resume <upload url> <file> <chunk size> [option...]
//   node tus_client.cjs create <endpoint> <file> <chunk size> <bearer token> <filename> <filetype> [option...]
// Options: --retry (retry delays: without them an interruption ends the run, so the test sees it
// and resumes with a new one); --override-patch (POST with X-HTTP-Method-Override: PATCH, as
// tus-js-client's overridePatchMethod sends); --endpoint=<url> --token=<bearer token> (resume: where
// the client creates a new upload, with that credential, when the upload URL cannot be resumed);
// --parallel=<n> (create: parallelUploads, n partial uploads concatenated by a final one, each part
// created with the same metadata); --upload-data-during-creation (create: the first chunk is the
// creation POST's body, tus creation-with-upload).
// NODE_PATH names the node_modules folder scripts/install-test-node-deps.sh filled.
const fs = require("fs");
const tus = require("tus-js-client");

const [mode, url, path, chunkSize, ...rest] = process.argv.slice(2);
const positional = rest.filter((arg) => !arg.startsWith("--"));
const named = Object.fromEntries(
  rest.filter((arg) => arg.startsWith("--")).map((arg) => {
    const [name, ...value] = arg.slice(2).split("=");
    return [name, value.join("=")];
  }),
);
const options = {
  chunkSize: Number(chunkSize),
  retryDelays: "retry" in named ? [100, 300, 1000, 2000, 3000, 5000] : null,
  overridePatchMethod: "override-patch" in named,
  uploadDataDuringCreation: "upload-data-during-creation" in named,
  storeFingerprintForResuming: false,
  onError: (error) => {
    console.log(JSON.stringify({ error: String(error) }));
    process.exit(2);
  },
  onSuccess: () => {
    console.log(JSON.stringify({ done: true, url: upload.url }));
    process.exit(0);
  },
};
if (mode === "create") {
  const [token, filename, filetype] = positional;
  options.endpoint = url;
  options.headers = { Authorization: `Bearer ${token}` };
  options.metadata = { filename, filetype };
  if (named.parallel) {
    options.parallelUploads = Number(named.parallel);
    options.metadataForPartialUploads = options.metadata;
  }
} else {
  options.uploadUrl = url;
  if (named.endpoint) {
    options.endpoint = named.endpoint;
    options.headers = { Authorization: `Bearer ${named.token}` };
    options.metadata = { filename: "resumed.jpg", filetype: "image/jpeg" };
  }
}
const upload = new tus.Upload(fs.readFileSync(path), options);
upload.start();
