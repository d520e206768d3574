// Uploads a file with tus-js-client under Node; prints one JSON line and exits 0 on success.
//   node tus_client.cjs resume <upload url> <file> <chunk size> [retry]
//   node tus_client.cjs create <endpoint> <file> <chunk size> <bearer token> <filename> <filetype>
// NODE_PATH names the node_modules folder scripts/install-test-node-deps.sh filled.
const fs = require("fs");
const tus = require("tus-js-client");

const [mode, url, path, chunkSize, ...rest] = process.argv.slice(2);
const options = {
  chunkSize: Number(chunkSize),
  // Without retries an interruption ends the run, so the test sees it and resumes with a new one.
  retryDelays: rest[0] === "retry" ? [100, 300, 1000, 2000, 3000, 5000] : null,
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
  const [token, filename, filetype] = rest;
  options.endpoint = url;
  options.headers = { Authorization: `Bearer ${token}` };
  options.metadata = { filename, filetype };
} else {
  options.uploadUrl = url;
}
const upload = new tus.Upload(fs.readFileSync(path), options);
upload.start();
